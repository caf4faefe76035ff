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
    max_length: int = 128
    batch_size: int = 32
    val_fraction: float = 0.05
    split_seed: int = 0
    short_seq_prob: float = 0.1
    pad_to_multiple_of: int = 8
    cache_dir: Optional[str] = None
    num_proc: Optional[int] = None
    vocab_sample_mb: float = 64
    num_workers: Optional[int] = None


@dataclass
class TextFileDataSchema(DataSchema):
    encoding: str = "utf-8"
    segmenter: str = "rjieba"
    text_field: str = "text"
    documents: str = "auto"  # auto | blank_lines | lines | file: how plain text is cut into documents


@dataclass
class ScratchSizeSchema:
    """What every scratch model option sets, in the config field names both families share."""
    _target_: str = "bertexp.modeling.ScratchBert"
    path: Optional[str] = None  # only for task=... (fine-tuning loads model.path whatever the model group)
    vocab_size: int = 8000
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flash_attention_3 (bertexp.modeling.ATTENTION)


@dataclass
class ScratchModelSchema(ScratchSizeSchema):  # BertConfig fields (model=bert_*)
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02


@dataclass
class ScratchModernBertSchema(ScratchSizeSchema):  # ModernBertConfig fields (model=modernbert_*)
    _target_: str = "bertexp.modeling.ScratchModernBert"
    intermediate_size: int = 344
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    reference_compile: bool = False


@dataclass
class PretrainedModelSchema:
    _target_: str = "bertexp.modeling.PretrainedBert"
    path: Optional[str] = None
    attn_implementation: str = "sdpa"


@dataclass
class OptimSchema:
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    warmup_fraction: Optional[float] = 0.04
    min_lr_ratio: float = 0.1
    schedule: str = "linear"
    decay_fraction: float = 0.2
    grad_clip: Optional[float] = 1.0
    optimizer: Any = None


@dataclass
class MaskingSchema:
    _target_: str = "bertexp.masking.TokenMasking"
    ratio: float = 0.3
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    schedule: str = "constant"
    final_ratio: Optional[float] = None
    step_at: float = 0.5
    prediction_ratio: Optional[float] = None


@dataclass
class SpanMaskingSchema(MaskingSchema):
    p: float = 0.2
    max_span: int = 10


@dataclass
class NgramMaskingSchema(MaskingSchema):
    ngram_probs: List[float] = field(default_factory=lambda: [0.4, 0.3, 0.2, 0.1])


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
    nsp_weight: float = 0.1
    mlm_bias_init: str = "unigram"


@dataclass
class TrainerSchema:
    max_steps: Optional[int] = 2500
    budget_minutes: Optional[float] = None
    max_tokens: Optional[float] = None  # a float so that 5e6 is accepted; must be whole
    max_flops: Optional[float] = None
    log_every: int = 20
    eval_every: int = 250
    exam_length: int = 128
    exam_pairs: Optional[int] = 2048
    save_every: int = 250
    keep_checkpoints: int = 2
    resume: str = "auto"
    allow_changes: List[str] = field(default_factory=list)
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    max_bad_steps: int = 0
    measure_mfu: bool = True
    grad_accum: int = 1
    downstream: List[str] = field(default_factory=list)
    downstream_settings: Dict[str, Any] = field(default_factory=dict)
    downstream_every_checkpoint: bool = False


@dataclass
class TaskSchema:
    name: str = "sentiment"
    seeds: int = 3
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 64
    warmup_fraction: float = 0.1
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    bucket: int = 1
    reuse_random_init: bool = True


@dataclass
class LoggerSchema:
    mode: str = "auto"  # the YAML's default is ${wandb_mode:}: offline or online by API key
    project: str = "bertexp"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: str = "pretrain"
    init_timeout: float = 15.0
    log_checkpoints: bool = False
    system_metrics: bool = True


SCHEMAS = {
    "data_schema": DataSchema,
    "text_file_schema": TextFileDataSchema,
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
