"""Models: a BERT built from scratch at a named size, or a local Hugging Face BERT directory loaded with its
own tokenizer and its pretrained MLM and NSP heads. Both are `BertForPreTraining`; the loss is computed here
with the MLM decoder run only on the selected positions (the other ~85% of its work would be thrown away),
which gives exactly `BertForPreTraining`'s loss."""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining

from bertexp.data.sources import user_path
from bertexp.data.tokenizer import load_tokenizer
from bertexp.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class ScratchBert:
    """A randomly initialised BERT; its vocabulary is trained on the corpus (`vocab_size` entries at most)."""

    fresh = True  # its heads may be initialised from the data (objective.mlm_bias_init)

    def __init__(self, vocab_size: int = 8000, path: str | None = None, **config):
        if path is not None:  # model.path is for loading (model=pretrained) and fine-tuning (task=...)
            raise ConfigError(f"model.path={path} is set, but this model is built from scratch: use "
                              "model=pretrained model.path=DIR to start from it, or task=NAME to fine-tune it")
        if vocab_size < 16:
            raise ConfigError(f"model.vocab_size={vocab_size} must be >= 16")
        h, n = config.get("hidden_size", 768), config.get("num_attention_heads", 12)
        if h % n:
            raise ConfigError(f"model.hidden_size={h} must be divisible by model.num_attention_heads={n}")
        self.vocab_size = vocab_size
        self.config = config

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings", 512))

    def tokenizer(self, data):
        return load_tokenizer(data.vocab_dir(self.vocab_size))

    def build(self, tokenizer) -> BertForPreTraining:
        cfg = BertConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, type_vocab_size=2, **self.config
        )
        cfg._attn_implementation = "sdpa"
        return BertForPreTraining(cfg)


class PretrainedBert:
    """A local directory in the layout of bert-base-chinese (config.json, weights, vocab.txt)."""

    fresh = False  # its pretrained heads are kept as they are

    def __init__(self, path: str | None = None):
        if not path or str(path) in ("???", "None"):
            raise ConfigError("model.path is not set: model=pretrained needs model.path=DIR (a Hugging Face BERT directory)")
        self.path = user_path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model.path: directory not found: {self.path}")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"model.path: {self.path} has no config.json")
        if not any((self.path / w).is_file() for w in WEIGHT_FILES):
            raise CheckpointError(f"model.path: {self.path} has no weights (expected one of {', '.join(WEIGHT_FILES[:2])})")
        if not ((self.path / "vocab.txt").is_file() or (self.path / "tokenizer.json").is_file()):
            raise CheckpointError(f"model.path: {self.path} has no vocab.txt or tokenizer.json")
        try:
            self.hf_config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"model.path: {self.path}/config.json is not valid JSON ({e})") from None

    @property
    def max_positions(self) -> int:
        return int(self.hf_config.get("max_position_embeddings", 512))

    def tokenizer(self, data=None):
        try:
            return load_tokenizer(self.path)
        except Exception as e:  # transformers raises many kinds here; the user needs the path and the reason
            raise CheckpointError(f"model.path: cannot load the tokenizer of {self.path}: {e}") from None

    def build(self, tokenizer) -> BertForPreTraining:
        n_vocab = self.hf_config.get("vocab_size")
        if n_vocab is not None and len(tokenizer) > n_vocab:
            raise CheckpointError(
                f"model.path: {self.path}: vocab has {len(tokenizer)} tokens but the model's embeddings have "
                f"{n_vocab} rows (config.json vocab_size)"
            )
        try:
            model = BertForPreTraining.from_pretrained(str(self.path), local_files_only=True, attn_implementation="sdpa")
        except Exception as e:
            raise CheckpointError(f"model.path: cannot load BERT weights from {self.path}: {e}") from None
        return model


def fit_attention_to_precision(model: BertForPreTraining, device_type: str, precision: str) -> None:
    """bf16 on CPU: plain matmul attention. PyTorch's fused CPU attention has a slow bf16 backward (28% of a
    bert_mini step in a profile); eager attention makes the bf16 step 25% faster. fp32 keeps SDPA."""
    if precision == "bf16" and device_type == "cpu":
        model.set_attn_implementation("eager")


def encoder_params(model: BertForPreTraining) -> int:
    """Parameters of the transformer layers (embeddings and heads excluded), as in the MFU formula."""
    return sum(p.numel() for p in model.bert.encoder.parameters())


class PretrainingObjective(torch.nn.Module):
    """MLM + NSP as `BertForPreTraining` defines them, with the MLM decoder run on selected positions only,
    and NSP weighted by `nsp_weight` (0 switches it off: RoBERTa's ablation; its head is still scored).

    A module (not a function) so DistributedDataParallel can wrap it: its forward is where gradients are
    hooked. It returns *sums*; the caller divides by the counts of the whole (global) batch, so the loss
    is the same however a batch is split across micro-batches and devices.

    `mlm_bias_init=unigram` starts the MLM output bias at the log-frequencies of the training tokens, so the
    first steps are not spent learning token frequencies through the bias (scratch models only; a loaded or
    resumed model keeps its own). The random initial weights still add noise to the logits at step 0.
    """

    def __init__(self, model: BertForPreTraining, nsp_weight: float = 1.0, mlm_bias_init: str = "zero"):
        super().__init__()
        if not (0.0 <= float(nsp_weight) < float("inf")):
            raise ConfigError(f"objective.nsp_weight={nsp_weight} must be a number >= 0 (0: MLM only)")
        if mlm_bias_init not in ("zero", "unigram"):
            raise ConfigError(f"objective.mlm_bias_init={mlm_bias_init!r} must be zero or unigram")
        self.model = model
        self.nsp_weight = float(nsp_weight)
        self.mlm_bias_init = mlm_bias_init

    def init_heads(self, train_ids) -> None:
        """Initialise the MLM output bias of a fresh model (see the class docstring)."""
        if self.mlm_bias_init != "unigram":
            return
        bias = self.model.cls.predictions.bias
        counts = torch.bincount(torch.as_tensor(train_ids, dtype=torch.long), minlength=bias.numel())
        counts = counts[: bias.numel()].double() + 1.0  # add-one: every entry gets a finite log-probability
        with torch.no_grad():
            bias.copy_((counts / counts.sum()).log().to(bias.dtype))

    def loss(self, mlm_mean: torch.Tensor, nsp_mean: torch.Tensor) -> torch.Tensor:
        # At weight 0 the NSP term stays in the graph (times 0), so DDP still sees a gradient for every parameter.
        return mlm_mean + self.nsp_weight * nsp_mean

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label):
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        seq, pooled = out[0], out[1]
        where = labels != -100
        targets = labels[where]
        logits = self.model.cls.predictions(seq[where])
        mlm_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        nsp_logits = self.model.cls.seq_relationship(pooled)
        nsp_sum = F.cross_entropy(nsp_logits.float(), next_sentence_label, reduction="sum")
        return mlm_sum, nsp_sum, logits, targets, nsp_logits
