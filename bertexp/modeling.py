"""Models: BERT or ModernBERT built from scratch at a named size, or a local Hugging Face directory of either
loaded with its own tokenizer and its pretrained heads. BERT is `BertForPreTraining` (MLM + NSP heads),
ModernBERT `ModernBertForMaskedLM` (no NSP head). The training loop, the exam, the FLOPs count and resume
reach a model only through its `Family` (chosen by `config.model_type`), so both families run the same code.
The loss is computed here with the MLM decoder run only on the selected positions (the other ~85% of its work
would be thrown away), which gives exactly the model's own MLM loss."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining, ModernBertConfig, ModernBertForMaskedLM

from bertexp.data.tokenizer import load_tokenizer
from bertexp.errors import CheckpointError, ConfigError
from bertexp.ranges import CHOICES

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class Family:
    """What bertexp needs of a model family, in one place: the classes, how to run the encoder, the heads, and
    what the FLOPs count needs. Stateless; `family_of` picks the instance by `config.model_type`."""

    model_type: str
    name: str
    model_class: type  # what its checkpoints are saved and loaded as
    has_nsp: bool

    def config(self, tokenizer, fields: dict):
        raise NotImplementedError

    def trunk(self, model) -> torch.nn.Module:
        """The transformer without its heads (what trainer.compile compiles)."""
        raise NotImplementedError

    def layers(self, model) -> torch.nn.Module:
        """The transformer layers, embeddings and heads excluded (the 6N of the FLOPs count)."""
        raise NotImplementedError

    def encode(self, model, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequence output, pooled output for the NSP head or None)."""
        raise NotImplementedError

    def mlm_head(self, model) -> list[torch.nn.Module]:
        """The modules from a sequence output to vocabulary logits, applied in order."""
        raise NotImplementedError

    def mlm_bias(self, model) -> torch.nn.Parameter:
        raise NotImplementedError

    def nsp_head(self, model) -> torch.nn.Module | None:
        return None

    def row_heads(self, model) -> list[torch.nn.Module]:
        """Modules run once per pair (pooler, NSP classifier), for the FLOPs count."""
        return []

    def attention_windows(self, config) -> list[int | None]:
        """Per layer, how far a query sees (|query - key| <= window), or None: the whole sequence."""
        return [None] * config.num_hidden_layers

    def load(self, path, attn_implementation: str = "sdpa"):
        """A model directory of this family (a checkpoint to resume, model=pretrained's)."""
        return self.model_class.from_pretrained(str(path), local_files_only=True, attn_implementation=attn_implementation)


class BertFamily(Family):
    model_type, name, model_class, has_nsp = "bert", "BERT", BertForPreTraining, True

    def config(self, tokenizer, fields: dict):
        return BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, type_vocab_size=2, **fields)

    def trunk(self, model):
        return model.bert

    def layers(self, model):
        return model.bert.encoder

    def encode(self, model, input_ids, attention_mask, token_type_ids):
        if model.config._attn_implementation == "sdpa" and attention_mask.dim() == 2:
            # The 4-D mask transformers would build for SDPA (True: attend), made here: building it, transformers
            # first asks whether any position is padded (padding_mask.all()), which on a GPU waits for the
            # device in every forward. Eager attention adds its mask, flash attention unpads with the 2-D one.
            attention_mask = attention_mask.bool()[:, None, None, :]
        out = model.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out[0], out[1]

    def mlm_head(self, model):
        return [model.cls.predictions]

    def mlm_bias(self, model):
        return model.cls.predictions.bias

    def nsp_head(self, model):
        return model.cls.seq_relationship

    def row_heads(self, model):
        return [model.bert.pooler, model.cls.seq_relationship]


class ModernBertFamily(Family):
    model_type, name, model_class, has_nsp = "modernbert", "ModernBERT", ModernBertForMaskedLM, False

    def config(self, tokenizer, fields: dict):
        # ModernBertConfig's special-token ids default to its own English vocabulary's; ours come from the tokenizer.
        return ModernBertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **fields)

    def trunk(self, model):
        return model.model

    def layers(self, model):
        return model.model.layers

    def encode(self, model, input_ids, attention_mask, token_type_ids):
        # No segment embeddings: token_type_ids have nothing to feed; no pooler either.
        if model.config._attn_implementation == "sdpa" and attention_mask.dim() == 2:
            # The SDPA masks transformers would build (True: attend), made here without its padding_mask.all()
            # check, which on a GPU waits for the device twice every forward (BertFamily.encode)
            full = attention_mask.bool()[:, None, None, :]
            at = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            band = (at[:, None] - at[None, :]).abs() <= model.config.sliding_window
            attention_mask = {"full_attention": full, "sliding_attention": full & band}
        return model.model(input_ids=input_ids, attention_mask=attention_mask)[0], None

    def mlm_head(self, model):
        return [model.head, model.decoder]

    def mlm_bias(self, model):
        return model.decoder.bias

    def attention_windows(self, config):
        # transformers' bidirectional sliding-window mask: |query - key| <= local_attention // 2 in a local layer
        # (layer_types since transformers 5; before, every global_attn_every_n_layers-th layer was global)
        every = getattr(config, "global_attn_every_n_layers", 3)
        types = getattr(config, "layer_types", None) or [
            "full_attention" if i % every == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
        return [config.local_attention // 2 if t == "sliding_attention" else None for t in types]


FAMILIES = {f.model_type: f for f in (BertFamily(), ModernBertFamily())}


def family_of(config) -> Family:
    """The family of a model, its config, or a config.json's dict."""
    config = getattr(config, "config", config)
    # a config.json older than transformers' model_type key is a BERT's (all model=pretrained loaded before)
    model_type = config.get("model_type", "bert") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type={model_type!r} is not a family bertexp trains (choose from {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def check_objective(family: Family, nsp_weight, mlm_bias_init) -> None:
    """objective.* against its ranges and the model: called before any slow work, and by the objective."""
    if not (0.0 <= float(nsp_weight) < float("inf")):
        raise ConfigError(f"objective.nsp_weight={nsp_weight} must be a number >= 0 (0: MLM only)")
    if mlm_bias_init not in ("zero", "unigram"):
        raise ConfigError(f"objective.mlm_bias_init={mlm_bias_init!r} must be zero or unigram")
    if float(nsp_weight) > 0 and not family.has_nsp:
        raise ConfigError(f"objective.nsp_weight={nsp_weight}: {family.name} has no next-sentence head; "
                          "use objective=mlm (MLM only)")


def family_of_dir(path) -> Family:
    """The family a model directory's config.json names."""
    return family_of(json.loads((Path(path) / "config.json").read_text()))


def load_pretrained(path, attn_implementation: str = "sdpa"):
    """A model directory (a checkpoint, or model=pretrained's), in the family its config.json names."""
    return family_of_dir(path).load(path, attn_implementation)


# model.attn_implementation: the attention kernels transformers offers both families. sdpa: PyTorch's fused
# attention, which with a padding mask runs the memory-efficient kernel (not flash); flash_attention_2/3: the
# flash-attn package's kernels (CUDA, bf16), which unpad the batch and skip padded positions, and pay where
# attention is a large share of the step: sequences of 512 and more (at 128 the matmuls of the layers dominate).
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
_FLASH_PACKAGE = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_attention(name: str) -> str:
    if name not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={name!r} must be one of {', '.join(ATTENTION)}")
    package = _FLASH_PACKAGE.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"model.attn_implementation={name} needs the {package} package (pip install flash-attn, "
                          "on a CUDA machine); use sdpa")
    return name


class ScratchBert:
    """A randomly initialised BERT; its vocabulary is trained on the corpus (`vocab_size` entries at most)."""

    fresh = True  # its heads may be initialised from the data (objective.mlm_bias_init)
    family: Family = FAMILIES["bert"]

    def __init__(self, vocab_size: int = 8000, path: str | None = None, revision: str | None = None,
                 attn_implementation: str = "sdpa", position_init: str = "random", **config):
        self.attn_implementation = check_attention(attn_implementation)
        if position_init not in CHOICES["model.position_init"]:
            raise ConfigError(f"model.position_init={position_init!r} must be one of "
                              f"{', '.join(CHOICES['model.position_init'])}")
        self.position_init = position_init
        if path is not None:  # model.path is for loading (model=pretrained) and fine-tuning (task=...)
            raise ConfigError(f"model.path={path} is set, but this model is built from scratch: use "
                              "model=pretrained model.path=DIR to start from it, or task=NAME to fine-tune it")
        if revision is not None:
            raise ConfigError(f"model.revision={revision} is set, but this model is built from scratch: it goes with "
                              "a Hub id in model.path (model=pretrained or task=NAME)")
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

    def build(self, tokenizer):
        cfg = self.family.config(tokenizer, self.config)
        cfg._attn_implementation = self.attn_implementation
        model = self.family.model_class(cfg)
        if self.position_init == "sinusoidal":
            sinusoidal_positions(model.bert.embeddings.position_embeddings.weight, cfg.initializer_range)
        return model



@torch.no_grad()
def sinusoidal_positions(table: torch.Tensor, std: float) -> None:
    """Fill a learned position table with the Transformer's sines and cosines (Vaswani et al. 2017), scaled so
    that its entries' root mean square is the std of the rest of the initial weights. Its rows are still learned; they start where a linear
    map sends each position to its neighbours (p_{i+k} is a rotation of p_i), which is what attention must find
    to use the characters next to a blank. Random rows give it no such map to start from."""
    n, d = table.shape
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    angles = pos * freq
    sincos = torch.zeros(n, d, dtype=torch.float64)
    sincos[:, 0::2], sincos[:, 1::2] = torch.sin(angles), torch.cos(angles)[:, : d // 2]
    table.copy_((sincos * (std * math.sqrt(2.0))).to(table.dtype))  # sin^2 + cos^2 = 1 over each pair


class ScratchModernBert(ScratchBert):
    """A randomly initialised ModernBERT, on the same corpus vocabulary as ScratchBert (so the same exam)."""

    family = FAMILIES["modernbert"]

    def __init__(self, vocab_size: int = 8000, path: str | None = None, revision: str | None = None,
                 attn_implementation: str = "sdpa", **config):
        super().__init__(vocab_size, path, revision, attn_implementation, **config)
        if int(config.get("global_attn_every_n_layers", 1)) < 1:
            raise ConfigError(f"model.global_attn_every_n_layers={config['global_attn_every_n_layers']} must be >= 1 "
                              "(1: every layer attends globally)")
        if int(config.get("local_attention", 2)) < 2:
            raise ConfigError(f"model.local_attention={config['local_attention']} must be >= 2 (the window a local "
                              "layer sees, both sides together)")


class PretrainedBert:
    """A local model directory or a Hugging Face Hub id (resolved to its snapshot in the HF cache, bertexp.hub):
    a BERT in the layout of bert-base-chinese (config.json, weights, vocab.txt), or a ModernBERT such as a
    bertexp checkpoint of one; config.json's model_type says which."""

    fresh = False  # its pretrained heads are kept as they are

    def __init__(self, path: str | None = None, revision: str | None = None, attn_implementation: str = "sdpa"):
        self.attn_implementation = check_attention(attn_implementation)
        if not path or str(path) in ("???", "None"):
            raise ConfigError("model.path is not set: model=pretrained needs model.path=DIR or a Hugging Face Hub id "
                              "(a BERT or ModernBERT)")
        from bertexp.hub import resolve

        self.source = resolve(path, revision)  # a Hub id becomes its snapshot in the HF cache
        self.path = self.source.dir
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
        try:
            self.family = family_of(self.hf_config)
        except ConfigError as e:
            raise CheckpointError(f"model.path: {self.path}: {e}") from None

    @property
    def max_positions(self) -> int:
        return int(self.hf_config.get("max_position_embeddings", 512))

    def tokenizer(self, data=None):
        try:
            return load_tokenizer(self.path)
        except Exception as e:  # transformers raises many kinds here; the user needs the path and the reason
            raise CheckpointError(f"model.path: cannot load the tokenizer of {self.path}: {e}") from None

    def build(self, tokenizer):
        n_vocab = self.hf_config.get("vocab_size")
        if n_vocab is not None and len(tokenizer) > n_vocab:
            raise CheckpointError(
                f"model.path: {self.path}: vocab has {len(tokenizer)} tokens but the model's embeddings have "
                f"{n_vocab} rows (config.json vocab_size)"
            )
        try:
            model, info = self.family.model_class.from_pretrained(
                str(self.path), local_files_only=True, attn_implementation=self.attn_implementation,
                output_loading_info=True)
        except Exception as e:
            raise CheckpointError(f"model.path: cannot load {self.family.name} weights from {self.path}: {e}") from None
        from bertexp.hub import report_new_heads

        report_new_heads(self.source.label, info.get("missing_keys") or [])
        return model


def check_attention_fits(chosen: str, device_type: str, precision: str) -> None:
    if chosen.startswith("flash") and (device_type != "cuda" or precision != "bf16"):
        raise ConfigError(f"model.attn_implementation={chosen} runs on a CUDA GPU in trainer.precision=bf16 only "
                          f"(this run: {device_type}, {precision}); use sdpa")


def fit_attention_to_precision(model, device_type: str, precision: str) -> None:
    """bf16 on CPU: plain matmul attention. PyTorch's fused CPU attention has a slow bf16 backward (28% of a
    bert_mini step in a profile); eager attention makes the bf16 step 25% faster. fp32 keeps SDPA. Flash
    attention (model.attn_implementation) runs on a GPU in bf16 only."""
    check_attention_fits(getattr(model.config, "_attn_implementation", "sdpa") or "sdpa", device_type, precision)
    if precision == "bf16" and device_type == "cpu":
        model.set_attn_implementation("eager")


def encoder_params(model) -> int:
    """Parameters of the transformer layers (embeddings and heads excluded), as in the MFU formula."""
    return sum(p.numel() for p in family_of(model).layers(model).parameters())


def attended_pairs(width: float, window: int | None) -> float:
    """(query, key) pairs of a sequence of `width` positions where |query - key| <= window (None: all)."""
    if window is None or window >= width - 1:
        return width * width
    return width * (2 * window + 1) - window * (window + 1)  # the full band, less the corners it loses at both ends


def linear_weights(modules) -> int:
    """Multiply-adds per position of the nn.Linear layers in `modules` (their weights' sizes)."""
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear))


class ModelFlops:
    """Model FLOPs, forward + backward (3 x the forward's 2 per multiply-add), counted as the model is run here:
    every padded position through the layers (6 x their parameters), attention's QK^T and AV (12 x hidden per
    (query, key) pair the mask lets through: all pairs in a global layer, the band |q - k| <= window in a local
    one, whatever kernel computes it), the MLM head (its Linear weights: transform and decoder) on the
    predicted positions only, as PretrainingObjective runs it, and the pooler and NSP classifier once per pair
    (BERT; ModernBERT has neither). Embedding lookups, norms outside the layers, softmax and RoPE are not counted."""

    def __init__(self, model):
        family = family_of(model)
        self.layer_params = encoder_params(model)
        self.hidden = model.config.hidden_size
        self.windows = family.attention_windows(model.config)
        self.mlm_head = linear_weights(family.mlm_head(model))
        self.row_heads = linear_weights(family.row_heads(model))

    def attention_pairs(self, width: float) -> float:
        return sum(attended_pairs(width, w) for w in self.windows)

    def per_token(self, width: float) -> float:
        """The encoder's FLOPs per position of a sequence `width` wide (the MFU numerator)."""
        return 6 * self.layer_params + 12 * self.hidden * self.attention_pairs(width) / width

    def step(self, rows: int, width: int, predicted: int) -> float:
        return (6 * self.layer_params * rows * width + 12 * self.hidden * self.attention_pairs(width) * rows
                + 6 * self.mlm_head * predicted + 6 * self.row_heads * rows)


class PretrainingObjective(torch.nn.Module):
    """MLM (+ NSP where the model has a head for it) as the model's own pretraining class defines them, with the
    MLM decoder run on selected positions only, and NSP weighted by `nsp_weight` (0 switches it off: RoBERTa's
    ablation; a BERT's NSP head is still scored). The model is reached through its `Family` only.

    A module (not a function) so DistributedDataParallel can wrap it: its forward is where gradients are
    hooked. It returns *sums*; the caller divides by the counts of the whole (global) batch, so the loss
    is the same however a batch is split across micro-batches and devices.

    `mlm_bias_init=unigram` starts the MLM output bias at the log-frequencies of the training tokens, so the
    first steps are not spent learning token frequencies through the bias (scratch models only; a loaded or
    resumed model keeps its own). The random initial weights still add noise to the logits at step 0.
    """

    def __init__(self, model, nsp_weight: float = 1.0, mlm_bias_init: str = "zero"):
        super().__init__()
        self.family = family_of(model)
        check_objective(self.family, nsp_weight, mlm_bias_init)
        self.model = model
        self.nsp_weight = float(nsp_weight)
        self.mlm_bias_init = mlm_bias_init

    @property
    def has_nsp(self) -> bool:
        return self.family.has_nsp

    def init_heads(self, train_ids) -> None:
        """Initialise the MLM output bias of a fresh model (see the class docstring)."""
        if self.mlm_bias_init != "unigram":
            return
        bias = self.family.mlm_bias(self.model)
        counts = torch.bincount(torch.as_tensor(train_ids, dtype=torch.long), minlength=bias.numel())
        counts = counts[: bias.numel()].double() + 1.0  # add-one: every entry gets a finite log-probability
        with torch.no_grad():
            bias.copy_((counts / counts.sum()).log().to(bias.dtype))

    def loss(self, mlm_mean: torch.Tensor, nsp_mean: torch.Tensor) -> torch.Tensor:
        # At weight 0 the NSP term stays in the graph (times 0), so DDP still sees a gradient for every parameter.
        return mlm_mean + self.nsp_weight * nsp_mean

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label, predicted=None):
        """(MLM loss sum, NSP loss sum (0 without an NSP head), MLM logits at the predicted positions, their
        targets, NSP logits or None).

        `predicted`: the flat indices (row x width + column) of the labelled positions, found where the labels
        were made (the CPU), with `labels` then their targets in that order. Finding them here from -100s is
        a boolean index, which on a GPU waits for the device (a sync per micro-batch)."""
        seq, pooled = self.family.encode(self.model, input_ids, attention_mask, token_type_ids)
        if predicted is None:
            where = labels != -100
            targets = labels[where]
            logits = seq[where]
        else:
            targets = labels
            logits = seq.reshape(-1, seq.shape[-1]).index_select(0, predicted)
        for module in self.family.mlm_head(self.model):
            logits = module(logits)
        mlm_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        nsp_head = self.family.nsp_head(self.model)
        if nsp_head is None:
            return mlm_sum, mlm_sum.new_zeros(()), logits, targets, None
        nsp_logits = nsp_head(pooled)
        nsp_sum = F.cross_entropy(nsp_logits.float(), next_sentence_label, reduction="sum")
        return mlm_sum, nsp_sum, logits, targets, nsp_logits


def feed(batch: dict, ids: torch.Tensor, labels: torch.Tensor, rows: slice, device: torch.device,
         compiled: bool = False) -> tuple:
    """The objective's arguments for `rows` of a masked batch, on `device`: only the tensors the model reads,
    and the predicted positions as flat indices with their targets, found here on the CPU, where the labels
    are (PretrainingObjective.forward: on the GPU that search would wait for the device). Compiled: the width
    and the predicted count vary from step to step and are marked dynamic, the batch dimension is not."""
    flat = labels[rows].reshape(-1)
    where = (flat != -100).nonzero().squeeze(1)
    put = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    out = (put(ids[rows]), put(batch["attention_mask"][rows]), put(batch["token_type_ids"][rows]), put(flat[where]),
           put(batch["next_sentence_label"][rows]), put(where))
    if compiled:
        for t in out[:3]:
            torch._dynamo.maybe_mark_dynamic(t, 1)
        for t in (out[3], out[5]):
            torch._dynamo.maybe_mark_dynamic(t, 0)
    return out
