"""Structured config schemas, one per group option, registered in Hydra's ConfigStore.

Each YAML in conf/ names its schema first in its defaults list (`- /schema/NAME@_here_`; the schemas live in a
group of their own, so `masking=masking_schema` is no option), so a wrong type (`data.batch_size=abc`)
or an unknown key (`optim.lrr=1e-4`) is rejected when the config is composed, before anything runs.
Ranges (ratio in (0, 1), max_length >= 8, ...) are checked by the objects that use them, with messages
that name the field, the value and the allowed range.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DataSchema:
    _target_: str = "bertexp.data.dataset.PretrainingData.from_peoples_daily"
    path: Any = None  # a file, directory or glob; or a list of them (data=text_file)
    max_length: int = 128  # tokens per [CLS] A [SEP] B [SEP] pair (8 .. the model's position limit)
    batch_size: int = 32  # pairs per optimizer step
    val_fraction: float = 0.05  # share of documents held out for evaluation, in [0, 0.5]
    split_seed: int = 0  # fixes the held-out documents and eval masks, independent of `seed`
    short_seq_prob: float = 0.1  # BERT's share of shorter-than-max pairs
    pad_to_multiple_of: int = 8  # dynamic padding to the batch's longest pair, rounded up to this
    cache_dir: Optional[str] = None  # vocabularies and tokenised corpora; null: $BERTEXP_CACHE or ~/.cache/bertexp
    num_proc: Optional[int] = None  # processes that tokenise the corpus (once; then cached); null: every core
    vocab_sample_mb: float = 64  # a scratch model's WordPiece vocabulary is trained on the corpus's first this many MB
    num_workers: Optional[int] = None  # processes building and masking upcoming batches (0: the training thread; null: 2 on a GPU, 0 on a CPU)


@dataclass
class TextFileDataSchema(DataSchema):
    encoding: str = "utf-8"  # the files' text encoding (e.g. gb18030 for GBK-encoded Chinese)
    segmenter: str = "rjieba"  # word segmenter for whole-word masking: rjieba | jieba | none
    text_field: str = "text"  # JSON lines / Parquet: the field that holds a document's text
    documents: str = "auto"  # auto | blank_lines | lines | file: how plain text is cut into documents


@dataclass
class HFDatasetSchema(DataSchema):
    """data=hf_dataset: a `datasets` dataset (bertexp/data/hf_dataset.py)."""
    name: Optional[str] = None  # a Hub dataset id, a builder (json, parquet, text, csv) or a save_to_disk directory
    config_name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    data_files: Any = None  # the builder's files: a path, glob, list, or {split: files}
    revision: Optional[str] = None
    streaming: bool = False
    segmenter: str = "rjieba"


@dataclass
class ScratchSizeSchema:
    """What every scratch model option sets, in the config field names both families share."""
    _target_: str = "bertexp.modeling.ScratchBert"
    path: Optional[str] = None  # only for task=... (fine-tuning loads model.path whatever the model group)
    revision: Optional[str] = None  # with a Hub id in model.path: a branch, tag or commit
    vocab_size: int = 8000  # at most this many WordPiece entries, trained on the corpus (the model has what training gives)
    hidden_size: int = 128  # width of the encoder (BertConfig / ModernBertConfig field)
    num_hidden_layers: int = 2  # encoder layers
    num_attention_heads: int = 2  # attention heads per layer (divides hidden_size)
    intermediate_size: int = 512  # width of each layer's feed-forward block
    max_position_embeddings: int = 512  # the longest input the model takes (data.max_length is checked against it)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flash_attention_3 (bertexp.modeling.ATTENTION)


@dataclass
class ScratchModelSchema(ScratchSizeSchema):  # BertConfig fields (model=bert_*)
    hidden_dropout_prob: float = 0.0  # dropout after attention and feed-forward blocks
    attention_probs_dropout_prob: float = 0.0  # dropout on attention weights (0 keeps the fused SDPA kernel)
    initializer_range: float = 0.02  # std of the initial weights
    position_init: str = "random"  # random (BERT) | sinusoidal: the learned position table starts as sines and cosines


@dataclass
class ScratchModernBertSchema(ScratchSizeSchema):  # ModernBertConfig fields (model=modernbert_*)
    _target_: str = "bertexp.modeling.ScratchModernBert"
    intermediate_size: int = 344
    local_attention: int = 128  # tokens a local-attention layer sees
    global_attn_every_n_layers: int = 3  # every Nth layer attends globally
    embedding_dropout: float = 0.0  # dropout on the embeddings
    mlp_dropout: float = 0.0  # dropout in the feed-forward blocks
    attention_dropout: float = 0.0  # dropout on attention weights
    initializer_range: float = 0.02  # std of the initial weights
    reference_compile: bool = False  # let transformers compile parts of ModernBERT itself (trainer.compile decides instead)


@dataclass
class PretrainedModelSchema:
    _target_: str = "bertexp.modeling.PretrainedBert"
    path: Optional[str] = None  # a local directory or a Hugging Face Hub id (bertexp.hub)
    revision: Optional[str] = None  # with a Hub id: a branch, tag or commit (default: main)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flash_attention_3


@dataclass
class OptimSchema:
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay (biases and LayerNorm excluded)
    warmup_steps: int = 100  # linear warm-up steps
    warmup_fraction: Optional[float] = 0.04  # warm-up also ends at this fraction of the run, if that comes first (null: by steps only)
    min_lr_ratio: float = 0.1  # the lr decays to min_lr_ratio * lr at the end of the run
    schedule: str = "linear"  # after warm-up: linear | cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the final share of the run over which the lr decays
    grad_clip: Optional[float] = 1.0  # max global gradient norm (null or <= 0: no clipping)
    optimizer: Any = None  # the torch optimizer, built with the model's parameter groups at run time


@dataclass
class MaskingSchema:
    _target_: str = "bertexp.masking.TokenMasking"
    ratio: float = 0.4  # share of non-special tokens selected, in (0, 1)
    mask_token_prob: float = 0.8  # of the selected: share replaced by [MASK]
    random_token_prob: float = 0.1  # of the selected: share replaced by a random token (the rest unchanged)
    schedule: str = "constant"  # mask-rate schedule: constant | linear | cosine | step
    final_ratio: Optional[float] = None  # the ratio at the end of the run (linear, cosine, step)
    step_at: float = 0.5  # step: the fraction of the run at which the ratio switches
    prediction_ratio: Optional[float] = None  # share of non-special tokens whose prediction is scored (null: the selected)


@dataclass
class SpanMaskingSchema(MaskingSchema):
    p: float = 0.2  # geometric parameter of span lengths (SpanBERT: 0.2, mean length 1/p)
    max_span: int = 10  # longest span, in words


@dataclass
class NgramMaskingSchema(MaskingSchema):
    ngram_probs: List[float] = field(default_factory=lambda: [0.4, 0.3, 0.2, 0.1])  # probability of masking an n-gram of 1, 2, 3, ... words (sums to 1)


@dataclass
class PmiMaskingSchema(MaskingSchema):
    max_n: int = 5
    min_count: int = 10
    min_pmi: float = 1.0
    max_ngrams: Optional[int] = 100_000


@dataclass
class ObjectiveSchema:
    _target_: str = "bertexp.modeling.PretrainingObjective"
    _partial_: bool = True
    nsp_weight: float = 0.1  # loss = mlm + nsp_weight * nsp (0: MLM only)
    mlm_bias_init: str = "unigram"  # unigram: MLM output bias starts at the training log-frequencies | zero


@dataclass
class TrainerSchema:
    max_steps: Optional[int] = 2650  # optimizer steps (unless a budget is set)
    budget_minutes: Optional[float] = None  # wall-clock minutes of training steps (ends the run instead of max_steps)
    max_tokens: Optional[float] = None  # a float so that 5e6 is accepted; must be whole
    max_flops: Optional[float] = None
    log_every: int = 20  # train metrics to metrics.jsonl / W&B every N steps
    eval_every: int = 250  # held-out evaluation every N steps (and at the end)
    eval_at_start: bool = False  # also take the exam before the first step (continued pretraining: before and after)
    exam_length: int = 128  # the exam's pairs are built at this length
    exam_pairs: Optional[int] = 2048  # at most this many held-out pairs in the exam (null: all)
    save_every: int = 250  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # keep the last K checkpoints
    resume: str = "auto"  # auto | never | PATH to a checkpoint
    allow_changes: List[str] = field(default_factory=list)  # keys that may differ from the checkpoint resumed from, e.g. [trainer.max_steps]
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | tf32 | bf16
    compile: bool = False  # torch.compile the encoder
    max_bad_steps: int = 0  # non-finite losses tolerated (update skipped) before stopping
    measure_mfu: bool = True  # time a matmul at start to report throughput/mfu_measured (mfu_spec: a GPU's data sheet)
    grad_accum: int = 1  # micro-batches per optimizer step
    downstream: List[str] = field(default_factory=list)  # after pretraining, fine-tune the final checkpoint on these tasks
    downstream_settings: Dict[str, Any] = field(default_factory=dict)  # overrides of conf/task/*.yaml for them
    downstream_every_checkpoint: bool = False  # also fine-tune every earlier checkpoint on disk


@dataclass
class TaskSchema:
    name: str = "sentiment"  # sentiment | ner
    seeds: int = 3  # fine-tuning seeds (mean ± sd over them)
    epochs: int = 2  # epochs per fine-tuning run
    lr: float = 1e-3  # fine-tuning learning rate
    batch_size: int = 32  # examples per step
    max_length: int = 64  # tokens per example (longer ones are truncated)
    warmup_fraction: float = 0.1  # share of fine-tuning steps spent warming up the lr
    train_limit: Optional[int] = None  # use only this many training examples (null: all)
    eval_limit: Optional[int] = None  # score only this many dev and test examples (null: all)
    bucket: int = 1  # batches of similar length per shuffled chunk (1: plain shuffling)
    reuse_random_init: bool = True  # reuse cached random-init results (they do not depend on the weights)


@dataclass
class LoggerSchema:
    mode: str = "auto"  # the YAML's default is ${wandb_mode:}: offline or online by API key
    project: str = "bertexp"  # the W&B project
    entity: Optional[str] = None  # the W&B entity (null: your default)
    group: Optional[str] = None  # the W&B group (null: the sweep in a multirun, else `experiment`)
    job_type: str = "pretrain"  # the W&B job type of pretraining runs
    init_timeout: float = 15.0  # seconds; an unreachable server means offline, never a hang
    log_checkpoints: bool = False  # log the final checkpoint as a W&B model artifact
    system_metrics: bool = True  # sample CPU, memory and GPU use into the run
    tags: List[str] = field(default_factory=list)  # added to bertexp's own tags (data, model, masking, objective, ...)
    name: Optional[str] = None  # the W&B run's name (in a sweep, it prefixes each job's swept values)
    notes: Optional[str] = None  # the W&B run's notes (default: the command that ran)


SCHEMAS = {
    "data_schema": DataSchema,
    "text_file_schema": TextFileDataSchema,
    "hf_dataset_schema": HFDatasetSchema,
    "scratch_schema": ScratchModelSchema,
    "modernbert_schema": ScratchModernBertSchema,
    "pretrained_schema": PretrainedModelSchema,
    "optim_schema": OptimSchema,
    "masking_schema": MaskingSchema,
    "span_schema": SpanMaskingSchema,
    "ngram_schema": NgramMaskingSchema,
    "pmi_schema": PmiMaskingSchema,
    "objective_schema": ObjectiveSchema,
    "trainer_schema": TrainerSchema,
    "task_schema": TaskSchema,
    "logger_schema": LoggerSchema,
}


def register() -> None:
    # conf/hydra/launcher/submitit_slurm.yaml deliberately shares the plugin's name, so the plugin's schema
    # type-checks it; Hydra notes that matching as deprecated on every run. The check is what we want.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():  # a group of their own: never offered as an option of a real group
        cs.store(group="schema", name=name, node=node)


register()
