"""Downstream evaluation: does a pretrained encoder make a better model for a real task?

`python run.py task=sentiment model.path=RUN/checkpoints/last` (or `task=ner`) fine-tunes the encoder with the
Auto classes' `...ForSequenceClassification` / `...ForTokenClassification` of its family (BERT or ModernBERT,
from its config.json) over `task.seeds` fine-tuning seeds, and the
same architecture from random initialisation over the same seeds, and reports both beside the task's
trivial baseline (majority class; for NER a dictionary of training entities). Each fine-tuning run trains
`task.epochs` epochs, scores dev after each and reports test at its best dev epoch; the summary is mean ± sd
over seeds of dev and test. A pretraining run can do this itself at its end: `trainer.downstream=[sentiment]`.

It shares the pretraining run's parts: device and precision (bertexp.device), per-step seeds
(bertexp.data.loader), the optimizer's parameter groups, gradient clipping and the lr schedule
(bertexp.optim), the signal handling that stops a run after its current step (bertexp.lifecycle), the
progress bar, and the tracker
(metrics.jsonl + W&B, `job_type=finetune`, in the pretraining run's group, with its run id and step in the
config). Everything random comes from (seed, init): the same command gives the same numbers on CPU.

Each fine-tuning run's result is written as soon as it ends (`OUT/seeds/INIT-seedN.json`, with the key of
everything it depends on), so a killed job loses only the run it was in: the same command into the same run
dir keeps the finished seeds and runs the rest. A random-init run depends on the checkpoint's architecture,
not its weights: its result is also cached (`$BERTEXP_CACHE/finetune/`, keyed by architecture, data as
encoded, task and optimizer settings, precision, versions and seed) and reused for every checkpoint of the
same architecture and vocabulary (`task.reuse_random_init=false` trains it again).
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bertexp.data.cache import write_atomically
from bertexp.errors import ConfigError
from bertexp.lifecycle import SEEDS_DIR, StopFlag
from bertexp.ranges import TASKS, check_task

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Encoded:
    ids: torch.Tensor
    attention: torch.Tensor
    labels: torch.Tensor  # (n,) for sequence tasks, (n, length) with -100 off the first token of a char
    chars_at: list | None = None  # token tasks: per example, (token position, character index) of each label


def task_config(name: str) -> DictConfig:
    """conf/task/NAME.yaml, for a pretraining run's `trainer.downstream` (outside `task=` composition)."""
    path = CONF_DIR / "task" / f"{name}.yaml"
    if name not in TASKS or not path.is_file():
        raise ConfigError(f"trainer.downstream: unknown task {name!r} (choose from {', '.join(TASKS)})")
    cfg = OmegaConf.load(path)
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "defaults"])


PEOPLES_DAILY = "bertexp.data.dataset.PretrainingData.from_peoples_daily"
SPLIT_KEYS = ("path", "split_seed", "val_fraction")  # what decides which documents pretraining held out


def downstream_configs(trainer_cfg) -> dict[str, DictConfig]:
    """Each task of `trainer.downstream` with `trainer.downstream_settings` applied, checked now: an unknown
    task, setting or value is an error before pretraining starts, not after it."""
    settings = dict(trainer_cfg.get("downstream_settings") or {})
    out = {}
    for name in trainer_cfg.get("downstream") or []:
        tc = task_config(str(name))
        unknown = sorted(set(settings) - set(tc))
        if unknown:
            raise ConfigError(f"trainer.downstream_settings: unknown setting {unknown[0]!r} (settings: "
                              f"{', '.join(k for k in tc if k != 'name')})")
        tc = OmegaConf.merge(tc, settings)
        check_task(tc)
        out[str(name)] = tc
    return out


def check_downstream(cfg) -> None:
    """Every precondition of `trainer.downstream` that can fail, checked before pretraining starts."""
    tasks = downstream_configs(cfg.trainer)
    if "ner" in tasks and cfg.data.get("_target_") != PEOPLES_DAILY:
        raise ConfigError("trainer.downstream=[ner] needs data=peoples_daily: NER's dev and test are People's Daily "
                          "documents that pretraining holds out, which a run on another corpus cannot do "
                          "(drop ner, or pretrain on data=peoples_daily)")
    model_path = cfg.model.get("path") if str(cfg.model.get("_target_", "")).endswith("PretrainedBert") else None
    if "ner" in tasks and model_path:  # the run's final checkpoint will continue model.path's lineage
        from bertexp.data.sources import user_path
        from bertexp.rundir import flat_config, lineage_of, split_of

        parent = user_path(model_path)
        if parent.is_dir():
            check_lineage(split_of(flat_config(cfg)), lineage_of(parent), "this run's final checkpoint")
    if "ner" in tasks and not float(cfg.data.get("val_fraction") or 0) > 0:
        raise ConfigError(f"trainer.downstream=[ner] needs held-out documents for NER's dev and test, but "
                          f"data.val_fraction={float(cfg.data.get('val_fraction') or 0):g} holds out none (drop ner, or set "
                          "data.val_fraction above 0)")


def ner_split(data_cfg, checkpoint: Path | None, typed: dict | None = None) -> tuple[DictConfig, dict]:
    """The data config whose held-out documents become NER's dev and test: the checkpoint's own pretraining
    split (its run_config.json), so no dev or test sentence was seen in pretraining. Refused in one line when
    that cannot hold: a checkpoint pretrained on another corpus, or a split typed on the command line (`typed`:
    data.* overrides) that differs from the checkpoint's. A directory bertexp did not train (no run config)
    uses the command's data settings, with a warning. Returns (data config, the split, for the records)."""
    from bertexp.rundir import checkpoint_config

    trained = checkpoint_config(checkpoint) if checkpoint is not None else None
    if trained is not None:
        from bertexp.rundir import lineage_of

        own, *ancestors = lineage_of(checkpoint)
        check_lineage(own, ancestors, str(checkpoint))
    if trained is None:
        if checkpoint is not None:
            log.warning("NER: %s records no pretraining data (not a bertexp checkpoint): its dev and test are the "
                        "held-out documents of data.split_seed=%s, which its pretraining may have seen", checkpoint,
                        data_cfg.get("split_seed"))
        cfg = data_cfg
        source = "command line"
    else:
        pretrained = {k[len("data."):]: v for k, v in trained.items() if k.startswith("data.")}
        if pretrained.get("_target_") != PEOPLES_DAILY:
            raise ConfigError(f"task=ner: {checkpoint} was pretrained on {pretrained.get('path') or pretrained.get('_target_')}, "
                              "not People's Daily, so NER's dev and test (People's Daily documents) were not held out "
                              "of it by its split; use a checkpoint pretrained with data=peoples_daily, or task=sentiment")
        for key, value in (typed or {}).items():
            if key in SPLIT_KEYS and json.dumps(value, default=str) != json.dumps(pretrained.get(key), default=str):
                raise ConfigError(f"task=ner: data.{key}={value} differs from the split {checkpoint} was pretrained "
                                  f"with (data.{key}={pretrained.get(key)}): NER's dev and test must be documents it "
                                  f"held out; drop data.{key}")
        mine = OmegaConf.to_container(data_cfg, resolve=True)
        cfg = OmegaConf.create({**mine, **{k: pretrained[k] for k in (*SPLIT_KEYS, "_target_") if k in pretrained}})
        source = str(checkpoint)
    split = {"from": source, **{k: cfg.get(k) for k in SPLIT_KEYS}}
    return cfg, split


def check_lineage(own: dict, ancestors: list[dict], checkpoint: str) -> None:
    """NER's dev and test are documents the checkpoint's pretraining held out (`own`, its split); every model it
    continued (`ancestors`, bertexp.rundir.lineage_of) must have held them out too. Refused in one line when an
    ancestor pretrained on another split (or cannot be followed); a warning when the chain starts at a model
    bertexp did not pretrain."""
    for a in ancestors:
        if "outside" in a:
            log.warning("NER: %s continues %s, a model bertexp did not pretrain: its pretraining may have seen the "
                        "held-out documents that are NER's dev and test", checkpoint, a["outside"])
        elif "unknown" in a:
            raise ConfigError(f"task=ner: {checkpoint} continues model.path={a['unknown']}, which is not found, so "
                              "which documents its pretraining saw cannot be checked (put it back, or use task=sentiment)")
        elif any(json.dumps(a.get(k), default=str) != json.dumps(own.get(k), default=str) for k in (*SPLIT_KEYS, "_target_")):
            shown = ", ".join(f"data.{k}={a.get(k)}" for k in SPLIT_KEYS if a.get(k) != own.get(k)) or "another corpus"
            raise ConfigError(f"task=ner: {checkpoint} continues {a['checkpoint']}, which was pretrained on another split "
                              f"({shown}): its training documents may be NER's dev and test; fine-tune a model whose "
                              "whole lineage used one split, or use task=sentiment")


def load_task(name: str, data_cfg, tokenizer, seed: int):
    from bertexp.data import tasks

    if name == "sentiment":
        return tasks.load_sentiment()
    from hydra.utils import instantiate

    data = instantiate(data_cfg)  # NER: the held-out documents of the pretraining split are its dev and test
    data.prepare(tokenizer, seed)
    return tasks.load_ner(data)


def baseline(task) -> dict:
    from bertexp.data import tasks

    if task.kind == "sequence":
        return {"name": "majority class", "dev": tasks.majority_baseline(task.train, task.dev),
                "test": tasks.majority_baseline(task.train, task.test),
                "also": {"name": "naive Bayes, char 1-2-grams", "dev": tasks.naive_bayes_baseline(task.train, task.dev),
                         "test": tasks.naive_bayes_baseline(task.train, task.test)}}
    dev = tasks.most_frequent_tag_baseline(task.train, task.dev)["f1"]
    test = tasks.most_frequent_tag_baseline(task.train, task.test)["f1"]
    return {"name": "dictionary of training entities", "dev": dev, "test": test}


def encode(task, split: list, tokenizer, max_length: int) -> Encoded:
    """Batch-tokenise a split with the encoder's own fast tokenizer. NER: one word per character; the label
    sits on the first token of each character (its other tokens, and [CLS]/[SEP], are -100)."""
    label_of = {n: i for i, n in enumerate(task.labels)}
    if task.kind == "sequence":
        enc = tokenizer([t for t, _ in split], truncation=True, max_length=max_length, padding="longest",
                        return_tensors="pt")
        return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in split]))
    enc = tokenizer([list(c) for c, _ in split], is_split_into_words=True, truncation=True,
                    max_length=max_length, padding="longest", return_tensors="pt")
    labels = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
    chars_at = []
    for i, (_, tags) in enumerate(split):
        prev, at = None, []
        for j, w in enumerate(enc.word_ids(i)):  # a character the tokenizer drops (a space) has no token
            if w is not None and w != prev:
                labels[i, j] = label_of[tags[w]]
                at.append((j, w))
            prev = w
        chars_at.append(at)
    return Encoded(enc["input_ids"], enc["attention_mask"], labels, chars_at)


def build_model(task, path: Path, init: str, seed: int):
    """The checkpoint's family (config.json) with a classifier for the task: from its weights, or a random
    initialisation of the same config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # not the table of pretraining heads left out and classifier weights added
    auto = AutoModelForSequenceClassification if task.kind == "sequence" else AutoModelForTokenClassification
    torch.manual_seed(seed)  # the new classifier's weights (and, from random init, all of them)
    kw = {"num_labels": len(task.labels), "id2label": dict(enumerate(task.labels))}
    if init == "pretrained":
        return auto.from_pretrained(str(path), local_files_only=True, **kw)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, **kw)
    return auto.from_config(config)


@torch.no_grad()
def predict(model, enc: Encoded, batch_size: int, device, amp) -> torch.Tensor:
    """Predictions for a split, in batches of rows of similar length (less padding); rows come back in order."""
    model.eval()
    lengths = enc.attention.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.zeros(enc.labels.shape, dtype=torch.long)
    for a in range(0, len(order), batch_size):
        rows = order[a : a + batch_size]
        width = int(lengths[rows].max())  # trim the split's padding to this batch's longest row
        with amp:
            logits = model(input_ids=enc.ids[rows, :width].to(device),
                           attention_mask=enc.attention[rows, :width].to(device)).logits
        pred = logits.float().argmax(-1).cpu()
        if pred.ndim == 2:
            out[rows, :width] = pred
        else:
            out[rows] = pred
    model.train()
    return out


def score(task, split: list, enc: Encoded, pred: torch.Tensor) -> float:
    """Accuracy for sentence classification; entity-level micro F1 (seqeval's default) for NER."""
    if task.kind == "sequence":
        return float((pred == enc.labels).float().mean())
    from bertexp.data.tasks import entity_f1

    gold, guess = [], []
    for i, (chars, tags) in enumerate(split):
        tagged = ["O"] * len(chars)  # characters beyond max_length (or without a token) count as predicted O
        for j, w in enc.chars_at[i]:
            tagged[w] = task.labels[int(pred[i, j])]
        guess.append(tagged)
        gold.append(list(tags))
    return float(entity_f1(gold, guess)["f1"])


def batch_order(lengths: torch.Tensor, batch_size: int, g: torch.Generator, bucket: int) -> list[torch.Tensor]:
    """One epoch's batches: a random permutation cut into chunks of `bucket` batches, each chunk sorted by
    length and cut into batches, the batches shuffled (less padding, still random batches; bucket=1: plain
    shuffling). Only full batches: n // batch_size of them."""
    n = len(lengths)
    order = torch.randperm(n, generator=g)[: (n // batch_size) * batch_size]
    if bucket > 1:
        chunks = []
        for a in range(0, len(order), bucket * batch_size):
            part = order[a : a + bucket * batch_size]
            chunks.append(part[torch.argsort(lengths[part], descending=True, stable=True)])
        order = torch.cat(chunks)
    batches = list(order.view(-1, batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def finetune_once(task, splits: dict, encoded: dict, path: Path, init: str, seed: int, tc, optim_cfg, device,
                  precision: str, tracker, step0: int, stop=None) -> dict:
    """One fine-tuning run; returns its dev score per epoch, test at the best dev epoch and the records it
    logged (steps counted from its own start; `step0` shifts them in the tracker)."""
    import time

    from bertexp.data.loader import step_seed
    from bertexp.errors import Interrupted
    from bertexp.modeling import fit_attention_to_precision
    from bertexp.optim import build_optimizer, build_scheduler

    started = time.perf_counter()
    model = build_model(task, path, init, seed).to(device)
    fit_attention_to_precision(model, device.type, precision)
    # warm-up over task.warmup_fraction of the fine-tuning steps (the step count never ends it first)
    ocfg = OmegaConf.merge(optim_cfg, {"lr": float(tc.lr), "warmup_steps": 10**9, "warmup_fraction": float(tc.warmup_fraction)})
    optimizer = build_optimizer(ocfg, model)
    scheduler = build_scheduler(ocfg, optimizer)
    clip = ocfg.get("grad_clip")
    clip = float(clip) if clip is not None and float(clip) > 0 else None
    params = [q for q in model.parameters() if q.requires_grad]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    train = encoded["train"]
    lengths = train.attention.sum(1)
    n, bs = len(train.ids), int(tc.batch_size)
    if n < bs:
        raise ConfigError(f"task.batch_size={bs} is larger than the {n} training examples (task.train_limit)")
    steps_per_epoch = n // bs
    total = steps_per_epoch * int(tc.epochs)
    stream = 0 if init == "pretrained" else 1
    g = torch.Generator().manual_seed(step_seed(seed, 0, 10 + stream))  # the batches of every epoch
    best = {"dev": -1.0}
    history, records = [], []
    step, loss_sum = 0, 0.0
    bar = tqdm(total=total, desc=f"{task.name} {init} seed {seed}", dynamic_ncols=True, mininterval=1.0, leave=False)
    for epoch in range(int(tc.epochs)):
        for rows in batch_order(lengths, bs, g, int(tc.get("bucket", 1) or 1)):
            width = int(lengths[rows].max())
            lr = scheduler.apply(step, step / total, (step + 1) / total)
            torch.manual_seed(step_seed(seed, step, 2 + stream))  # dropout
            with amp:
                out = model(input_ids=train.ids[rows, :width].to(device),
                            attention_mask=train.attention[rows, :width].to(device),
                            labels=(train.labels[rows] if task.kind == "sequence" else train.labels[rows, :width]).to(device))
            out.loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            loss_sum += loss
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            if stop is not None and stop.signum is not None:
                bar.close()
                raise Interrupted(f"stopped by {stop.name} during {task.name}, {init} init, seed {seed}", stop.exit_code)
        dev = score(task, splits["dev"], encoded["dev"], predict(model, encoded["dev"], 256, device, amp))
        record = {"step": step, f"finetune/{task.name}/{init}/dev": dev, "finetune/epoch": epoch + 1,
                  "finetune/seed": seed, "train/loss": loss_sum / steps_per_epoch}
        loss_sum = 0.0
        if dev > best["dev"]:
            test = score(task, splits["test"], encoded["test"], predict(model, encoded["test"], 256, device, amp))
            best = {"dev": dev, "test": test, "epoch": epoch + 1}
            record[f"finetune/{task.name}/{init}/test"] = test
        tracker.log({**record, "step": step0 + step})
        records.append(record)
        history.append(dev)
    bar.close()
    return {**best, "dev_per_epoch": history, "steps": step, "seconds": round(time.perf_counter() - started, 1),
            "records": records}


def stats(values: list[float]) -> dict:
    n = len(values)
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if n > 1 else None, "n": n,
            "values": [float(v) for v in values]}


def pretraining_origin(path: Path) -> dict:
    """The pretraining run a checkpoint comes from: its run dir, W&B id, step, name, group and tags (the
    fine-tuning run is named, grouped and tagged after it, not after this command's defaults)."""
    from bertexp.checkpoint import STATE_FILE, load_trainer_state
    from bertexp.rundir import RUN_INFO

    if not (path / STATE_FILE).is_file():  # a model bertexp did not train: a directory, or a Hub id's snapshot
        from bertexp.hub import describe

        return {"pretrain/checkpoint": str(path), **{f"pretrain/{k}": v for k, v in describe(path).items() if k != "path"}}
    saved = load_trainer_state(path)
    run = saved.get("run", {})
    try:
        info = json.loads((path / RUN_INFO).read_text())
    except (OSError, ValueError):  # a checkpoint of an older bertexp
        cfg = saved.get("config", {}) or {}
        info = {"group": (cfg.get("logger") or {}).get("group") or cfg.get("experiment") or "default"}
    return {"pretrain/checkpoint": str(path), "pretrain/run_dir": str(path.parent.parent),
            "pretrain/wandb_id": run.get("wandb_id"), "pretrain/step": run.get("step"),
            "pretrain/group": info.get("group"), "pretrain/name": info.get("name"), "pretrain/tags": info.get("tags")}


FINETUNE_VERSION = 2  # bump when a change to the fine-tuning loop changes what a run's result is
_BOOKKEEPING = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache")


def architecture(path: Path) -> dict:
    """The checkpoint's model config (config.json) without its bookkeeping: what random init depends on."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {k: v for k, v in sorted(cfg.items()) if k not in _BOOKKEEPING}


def data_digest(task, splits: dict, encoded: dict) -> str:
    """A hash of the examples (text and gold labels) and of the model's inputs (the tokenizer's ids)."""
    h = hashlib.sha1(json.dumps([task.name, task.labels], ensure_ascii=False).encode())
    for split in ("train", "dev", "test"):
        h.update(json.dumps(splits[split], ensure_ascii=False).encode())
        e = encoded[split]
        for t in (e.ids, e.attention, e.labels):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def random_cache_dir(data_cfg) -> Path:
    from bertexp.data.cache import cache_root

    return cache_root(data_cfg.get("cache_dir") if data_cfg is not None else None) / "finetune"


def _read_result(path: Path, key: str) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("result") if saved.get("key") == key else None


def _write_result(path: Path, key: str, result: dict, what: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: f.write(json.dumps({"key": key, "what": what, "result": result},
                                                       ensure_ascii=False).encode()))


def run_finetune(tc: DictConfig, path: Path, data_cfg, optim_cfg, trainer_cfg, out_dir: Path, logger_cfg: dict | None,
                 seed: int, info: dict, typed_data: dict | None = None) -> dict:
    """Fine-tune `path` on task `tc` over its seeds, from the pretrained weights and from random init; write
    each run's result as it ends, then `out_dir/summary.json`; return the summary. NER's dev and test follow the
    checkpoint's pretraining split (`ner_split`; `typed_data`: the data.* settings typed on the command line).
    Runs already finished in `out_dir` (a job stopped and started again) are kept with their records."""
    import time

    from bertexp.errors import Interrupted
    from bertexp.device import apply_matmul_precision, resolve_device, resolve_precision, use_device

    started = time.perf_counter()
    check_task(tc)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a model directory (no config.json); use e.g. RUN/checkpoints/last")
    device = resolve_device(str(trainer_cfg.device))
    use_device(device)  # cuda:N made current, as for pretraining
    precision = resolve_precision(str(trainer_cfg.precision), device)
    apply_matmul_precision(precision, device)
    job = _prepare_task(tc, path, data_cfg, seed, typed_data)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(tc, path, job, optim_cfg, precision, device, out_dir, data_cfg)
    origin = pretraining_origin(path)
    tracker = _finetune_tracker(tc, origin, out_dir, logger_cfg, info, resumed=bool(plan.in_dir))
    tracker.truncate_after(plan.keep_until)
    _log_plan(tc, path, job, plan)
    results = {"pretrained": [], "random": []}
    exit_code = 1
    try:
        with StopFlag() as stop:
            step0 = 0
            for i, (init, s) in enumerate(plan.runs):
                r = _one_run(tc, path, job, plan, i, init, s, optim_cfg, device, precision, tracker, step0, stop)
                step0 += r["steps"]
                results[init].append(r)
        summary = _summarise(tc, job, origin, plan, results, time.perf_counter() - started)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        flat = {f"downstream/{tc.name}/{init}/{split}_{k}": summary[init][split][k]
                for init in results for split in ("dev", "test") for k in ("mean", "sd")}
        tracker.summary({**flat, f"downstream/{tc.name}/baseline/test": job.baseline["test"]})
        print(describe(summary))
        summary["wandb"] = tracker.where()  # for the job's last line (task=): not in summary.json, it moves
        exit_code = 0
        return summary
    except Interrupted as e:
        exit_code = e.exit_code
        done = sum(1 for item in plan.runs if plan.source.get(item) in ("run dir", "trained"))
        raise Interrupted(f"{e}; the {done} fine-tuning run(s) finished are kept in {out_dir / SEEDS_DIR}: the same "
                          "command (same run dir) runs only the rest", e.exit_code) from None
    finally:
        tracker.finish(exit_code)


@dataclass
class TaskData:
    """A task's examples as this job uses them: splits (limited), encoded with the encoder's tokenizer."""

    task: object
    splits: dict
    encoded: dict
    baseline: dict
    pretrain_split: dict | None


def _prepare_task(tc, path: Path, data_cfg, seed: int, typed_data: dict | None) -> TaskData:
    from bertexp.data.tokenizer import load_tokenizer

    pretrain_split = None
    if tc.name == "ner":
        data_cfg, pretrain_split = ner_split(data_cfg, path, typed_data)
        log.info("NER dev and test: the held-out documents of the pretraining split (data.split_seed=%s, "
                 "data.val_fraction=%s, from %s)", pretrain_split["split_seed"], pretrain_split["val_fraction"],
                 pretrain_split["from"])
    tokenizer = load_tokenizer(path)
    task = load_task(tc.name, data_cfg, tokenizer, seed)
    splits = task.splits()
    for split, limit in (("train", tc.train_limit), ("dev", tc.get("eval_limit")), ("test", tc.get("eval_limit"))):
        if limit is not None:  # a fixed subset (a fixed shuffle's first N), the same for every seed and run
            keep = np.random.default_rng(0).permutation(len(splits[split]))[: int(limit)]
            splits[split] = [splits[split][i] for i in sorted(keep)]
    task.train, task.dev, task.test = splits["train"], splits["dev"], splits["test"]
    encoded = {k: encode(task, v, tokenizer, int(tc.max_length)) for k, v in splits.items()}
    return TaskData(task, splits, encoded, baseline(task), pretrain_split)


@dataclass
class Plan:
    """The fine-tuning runs of a job, in order, and which of them are already done (and where)."""

    runs: list  # [(init, seed)]
    keys: dict  # (init, seed) -> the key of everything its result depends on
    what: dict  # what the keys hash, saved beside each result
    found: dict  # (init, seed) -> result, for runs finished in the run dir or the random-init cache
    source: dict  # (init, seed) -> "run dir" | "cache" | "trained"
    seeds_dir: Path
    cache: Path

    @property
    def in_dir(self) -> list:
        return [item for item in self.runs if self.source.get(item) == "run dir"]

    @property
    def first_relog(self) -> int:
        """The first run whose records are not in the kept metrics (from there on, reused runs log again)."""
        return next((i for i, item in enumerate(self.runs) if self.source.get(item) != "run dir"), len(self.runs))

    @property
    def keep_until(self) -> int:
        return sum(self.found[item]["steps"] for item in self.runs[: self.first_relog])


def _plan(tc, path: Path, job: TaskData, optim_cfg, precision: str, device, out_dir: Path, data_cfg) -> Plan:
    import transformers

    # What a run's result depends on: random init on everything but the weights, pretrained on them too.
    what = {"v": FINETUNE_VERSION, "arch": architecture(path), "data": data_digest(job.task, job.splits, job.encoded),
            "task": {k: OmegaConf.to_container(tc, resolve=True).get(k)
                     for k in ("name", "epochs", "lr", "batch_size", "max_length", "warmup_fraction", "bucket")},
            "optim": OmegaConf.to_container(optim_cfg, resolve=True), "precision": precision, "device": device.type,
            "torch": torch.__version__, "transformers": transformers.__version__}
    from bertexp.rundir import weights_digest

    weights = weights_digest(path)
    keys = {(init, s): hashlib.sha1(json.dumps({**what, "init": init, "seed": s,
                                                "weights": weights if init == "pretrained" else None},
                                               sort_keys=True, default=str).encode()).hexdigest()[:20]
            for init in ("pretrained", "random") for s in range(1, int(tc.seeds) + 1)}
    plan = Plan(list(keys), keys, what, {}, {}, out_dir / SEEDS_DIR, random_cache_dir(data_cfg))
    for init, s in plan.runs:
        k = keys[(init, s)]
        r = _read_result(plan.seeds_dir / f"{init}-seed{s}.json", k)
        if r is not None:
            plan.found[(init, s)], plan.source[(init, s)] = r, "run dir"
        elif init == "random" and tc.get("reuse_random_init", True):
            r = _read_result(plan.cache / f"random-{k}.json", k)
            if r is not None:
                plan.found[(init, s)], plan.source[(init, s)] = r, "cache"
    return plan


def _finetune_tracker(tc, origin: dict, out_dir: Path, logger_cfg: dict | None, info: dict, resumed: bool):
    """metrics.jsonl and a W&B run (job_type=finetune) named, grouped and tagged after the pretraining run; a
    job that goes on from finished runs continues its W&B run (bertexp.lifecycle moves the id aside on a
    fresh start)."""
    from bertexp.tracking import Tracker, saved_wandb_id

    pre_name, pre_tags = origin.get("pretrain/name"), origin.get("pretrain/tags")
    where = f"{pre_name} step {origin.get('pretrain/step')}" if pre_name else Path(origin["pretrain/checkpoint"]).name
    named = bool(logger_cfg and logger_cfg.get("name"))  # logger.name: the job's name as run_info made it, kept
    run_info = {**info, "name": info["name"] if named else f"{tc.name} of {where}",
                "group": origin.get("pretrain/group") or info.get("group"),
                "tags": [*(pre_tags if pre_tags is not None else info.get("tags", [])), "finetune", tc.name]}
    config = {"task": OmegaConf.to_container(tc, resolve=True), **origin}
    logger = dict(logger_cfg, job_type="finetune") if logger_cfg else None
    return Tracker(out_dir, logger, run_info, config, saved_wandb_id(out_dir) if resumed else None)


def _log_plan(tc, path: Path, job: TaskData, plan: Plan) -> None:
    sizes, base = {k: len(v) for k, v in job.splits.items()}, job.baseline
    log.info("Fine-tuning %s on %s: %d train / %d dev / %d test examples, %d seeds, from the pretrained weights and "
             "from random init; %s baseline: dev %.4f, test %.4f", path, tc.name, sizes["train"], sizes["dev"],
             sizes["test"], int(tc.seeds), base["name"], base["dev"], base["test"])
    if plan.in_dir:
        log.info("Already finished in %s, not run again: %s", plan.seeds_dir,
                 ", ".join(f"{i} seed {s}" for i, s in plan.in_dir))
    cached = [s for (i, s), src in plan.source.items() if src == "cache"]
    if cached:
        log.info("Random init, seed(s) %s: reused from %s (a random-init run depends on the architecture, "
                 "vocabulary, data and settings, not on the checkpoint's weights; task.reuse_random_init=false "
                 "trains them again)", ", ".join(map(str, cached)), plan.cache)


def _one_run(tc, path: Path, job: TaskData, plan: Plan, i: int, init: str, s: int, optim_cfg, device, precision: str,
             tracker, step0: int, stop) -> dict:
    """The result of run i of the plan: reused (its records logged again where the kept metrics lack them), or
    trained now and written at once (random init also to the shared cache)."""
    if (init, s) in plan.found:
        r = plan.found[(init, s)]
        if i >= plan.first_relog:
            for rec in r.get("records", []):
                tracker.log({**rec, "step": step0 + rec["step"], "finetune/reused": plan.source[(init, s)]})
        return r
    r = finetune_once(job.task, job.splits, job.encoded, path, init, s, tc, optim_cfg, device, precision, tracker,
                      step0, stop)
    k = plan.keys[(init, s)]
    _write_result(plan.seeds_dir / f"{init}-seed{s}.json", k, r, plan.what)
    if init == "random":
        try:
            _write_result(plan.cache / f"random-{k}.json", k, r, plan.what)
        except OSError as e:  # a read-only cache costs a rerun next time, nothing else
            log.debug("random-init result not cached (%s)", e)
    plan.source[(init, s)] = "trained"
    log.info("%s, %s init, seed %d: dev %.4f, test %.4f (epoch %d), %.0f s", tc.name, init, s, r["dev"], r["test"],
             r["epoch"], r["seconds"])
    return r


def _summarise(tc, job: TaskData, origin: dict, plan: Plan, results: dict, seconds: float) -> dict:
    metric = "accuracy" if job.task.kind == "sequence" else "entity F1"
    return {"task": tc.name, "metric": metric, "baseline": job.baseline, **origin, "pretrain_split": job.pretrain_split,
            **{init: {"dev": stats([r["dev"] for r in rs]), "test": stats([r["test"] for r in rs]),
                      "source": [plan.source[(init, s)] for s in range(1, len(rs) + 1)]}
               for init, rs in results.items()},
            "sizes": {k: len(v) for k, v in job.splits.items()}, "seconds": round(seconds, 1)}


def _pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['sd']:.4f}" if s["sd"] is not None else f"{s['mean']:.4f}"


def _reused(summary: dict, init: str) -> str:
    src = summary[init].get("source") or []
    shown = []
    for where in ("run dir", "cache"):
        seeds = [str(i) for i, s in enumerate(src, 1) if s == where]
        if seeds:
            shown.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} reused from the {where}")
    return f"   ({'; '.join(shown)})" if shown else ""


def describe(summary: dict) -> str:
    t, m = summary["task"], summary["metric"]
    n = summary["pretrained"]["test"]["n"]
    took = f", {summary['seconds']:.0f} s" if summary.get("seconds") is not None else ""
    lines = [f"{t} ({m}, mean ± sd over {n} fine-tuning seeds; test at each seed's best dev epoch{took}):",
             f"  {'pretrained encoder':<31} dev {_pm(summary['pretrained']['dev'])}   test {_pm(summary['pretrained']['test'])}"
             + _reused(summary, "pretrained"),
             f"  {'random init':<31} dev {_pm(summary['random']['dev'])}   test {_pm(summary['random']['test'])}"
             + _reused(summary, "random"),
             f"  {summary['baseline']['name']:<31} dev {summary['baseline']['dev']:.4f}            test {summary['baseline']['test']:.4f}"]
    also = summary["baseline"].get("also")
    if also:
        lines.append(f"  {also['name']:<31} dev {also['dev']:.4f}            test {also['test']:.4f}")
    return "\n".join(lines)


def final_line(summary: dict, run_dir: Path) -> str:
    """The last line of a `task=` job, as pretraining's: the score, then where everything is."""
    test = summary["pretrained"]["test"]
    return (f"{summary['task']} test {summary['metric']} {_pm(test)} (random init {_pm(summary['random']['test'])}, "
            f"{summary['baseline']['name']} {summary['baseline']['test']:.4f}) | Run dir: {run_dir} | "
            f"{summary.get('wandb', 'W&B: off')}")
