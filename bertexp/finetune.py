"""Downstream evaluation: does a pretrained encoder make a better model for a real task?

`python run.py task=sentiment model.path=RUN/checkpoints/last` (or `task=ner`) fine-tunes the encoder with
`BertForSequenceClassification` / `BertForTokenClassification` over `task.seeds` fine-tuning seeds, and the
same architecture from random initialisation over the same seeds, and reports both beside the task's
trivial baseline (majority class; for NER a dictionary of training entities). Each fine-tuning run trains
`task.epochs` epochs, scores dev after each and reports test at its best dev epoch; the summary is mean ± sd
over seeds of dev and test. A pretraining run can do this itself at its end: `trainer.downstream=[sentiment]`.

It shares the pretraining run's parts: device and precision (bertexp.train), the optimizer's parameter
groups and the progress-driven lr schedule (bertexp.optim), the progress bar, and the tracker (metrics.jsonl
+ W&B, `job_type=finetune`, in the pretraining run's group, with its run id and step in the config).
Everything random comes from (seed, init): the same command gives the same numbers on CPU.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bertexp.errors import ConfigError

log = logging.getLogger(__name__)
TASKS = ("sentiment", "ner")
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


def check_task(tc) -> None:
    if tc.name not in TASKS:
        raise ConfigError(f"task.name={tc.name!r} must be one of {', '.join(TASKS)}")
    for field, low in (("seeds", 1), ("epochs", 1), ("batch_size", 1), ("max_length", 8)):
        if int(tc[field]) < low:
            raise ConfigError(f"task.{field}={tc[field]} must be >= {low}")
    if not float(tc.lr) > 0:
        raise ConfigError(f"task.lr={tc.lr} must be > 0")
    for field in ("train_limit", "eval_limit"):
        if tc.get(field) is not None and int(tc[field]) < 1:
            raise ConfigError(f"task.{field}={tc[field]} must be >= 1 (or null: all examples)")


def load_task(name: str, data_cfg, tokenizer, seed: int):
    from bertexp.data import tasks

    if name == "sentiment":
        return tasks.load_sentiment()
    from hydra.utils import instantiate

    data = instantiate(data_cfg)  # NER: the held-out documents of this pretraining split are its dev and test
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
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # not the table of pretraining heads left out and classifier weights added
    cls = BertForSequenceClassification if task.kind == "sequence" else BertForTokenClassification
    torch.manual_seed(seed)  # the new classifier's weights (and, from random init, all of them)
    kw = {"num_labels": len(task.labels), "id2label": dict(enumerate(task.labels))}
    if init == "pretrained":
        return cls.from_pretrained(str(path), local_files_only=True, **kw)
    config = BertConfig.from_pretrained(str(path), local_files_only=True, **kw)
    return cls(config)


@torch.no_grad()
def predict(model, enc: Encoded, batch_size: int, device, amp) -> torch.Tensor:
    model.eval()
    out = []
    for a in range(0, len(enc.ids), batch_size):
        rows = slice(a, a + batch_size)
        width = int(enc.attention[rows].sum(1).max())  # trim the split's padding to this batch's longest row
        with amp:
            logits = model(input_ids=enc.ids[rows, :width].to(device),
                           attention_mask=enc.attention[rows, :width].to(device)).logits
        pred = logits.float().argmax(-1).cpu()
        if pred.ndim == 2:
            pred = torch.nn.functional.pad(pred, (0, enc.ids.shape[1] - width))
        out.append(pred)
    model.train()
    return torch.cat(out)


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


def finetune_once(task, splits: dict, encoded: dict, path: Path, init: str, seed: int, tc, optim_cfg, device,
                  precision: str, tracker, step0: int) -> dict:
    """One fine-tuning run; returns its dev score per epoch and test at the best dev epoch."""
    from bertexp.optim import build_optimizer, build_scheduler

    model = build_model(task, path, init, seed).to(device)
    # warm-up over task.warmup_fraction of the fine-tuning steps (the step count never ends it first)
    ocfg = OmegaConf.merge(optim_cfg, {"lr": float(tc.lr), "warmup_steps": 10**9, "warmup_fraction": float(tc.warmup_fraction)})
    optimizer = build_optimizer(ocfg, model)
    scheduler = build_scheduler(ocfg, optimizer, by_budget=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    train = encoded["train"]
    n, bs = len(train.ids), int(tc.batch_size)
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * int(tc.epochs)
    g = torch.Generator().manual_seed(seed * 1000 + (init == "random"))
    best = {"dev": -1.0}
    history = []
    step, decay_from = 0, None
    bar = tqdm(total=total, desc=f"{task.name} {init} seed {seed}", dynamic_ncols=True, mininterval=1.0, leave=False)
    for epoch in range(int(tc.epochs)):
        order = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            rows = order[b * bs : (b + 1) * bs]
            width = int(train.attention[rows].sum(1).max())
            progress = step / total
            if decay_from is None and scheduler.warm(step, progress) >= 1.0:
                decay_from = progress
            lr = scheduler.set(step, (step + 1) / total, decay_from)
            torch.manual_seed(seed * 1_000_003 + step)  # dropout
            with amp:
                out = model(input_ids=train.ids[rows, :width].to(device),
                            attention_mask=train.attention[rows, :width].to(device),
                            labels=(train.labels[rows] if task.kind == "sequence" else train.labels[rows, :width]).to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(out.loss):.3f}", lr=f"{lr:.1e}")
        dev = score(task, splits["dev"], encoded["dev"], predict(model, encoded["dev"], 256, device, amp))
        record = {"step": step0 + step, f"finetune/{task.name}/{init}/dev": dev, "finetune/epoch": epoch + 1,
                  "finetune/seed": seed, "train/loss": float(out.loss.detach())}
        if dev > best["dev"]:
            test = score(task, splits["test"], encoded["test"], predict(model, encoded["test"], 256, device, amp))
            best = {"dev": dev, "test": test, "epoch": epoch + 1}
            record[f"finetune/{task.name}/{init}/test"] = test
        tracker.log(record)
        history.append(dev)
    bar.close()
    return {**best, "dev_per_epoch": history, "steps": step}


def stats(values: list[float]) -> dict:
    n = len(values)
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if n > 1 else None, "n": n,
            "values": [float(v) for v in values]}


def pretraining_origin(path: Path) -> dict:
    """The pretraining run a checkpoint comes from: its run dir, W&B id, step and group (for grouping)."""
    from bertexp.checkpoint import STATE_FILE, load_trainer_state

    if not (path / STATE_FILE).is_file():
        return {"pretrain/checkpoint": str(path)}
    saved = load_trainer_state(path)
    run = saved.get("run", {})
    cfg = saved.get("config", {}) or {}
    run_dir = path.parent.parent
    group = (cfg.get("logger") or {}).get("group") or cfg.get("experiment") or "default"
    if group == "default" and (run_dir.parent / "multirun.yaml").is_file():
        group = f"sweep-{run_dir.parent.name}"
    return {"pretrain/checkpoint": str(path), "pretrain/run_dir": str(run_dir), "pretrain/wandb_id": run.get("wandb_id"),
            "pretrain/step": run.get("step"), "pretrain/group": group}


def run_finetune(tc: DictConfig, path: Path, data_cfg, optim_cfg, trainer_cfg, out_dir: Path, logger_cfg: dict | None,
                 seed: int, info: dict) -> dict:
    """Fine-tune `path` on task `tc` over its seeds, from the pretrained weights and from random init; write
    `out_dir/summary.json` and metrics; return the summary."""
    from bertexp.data.tokenizer import load_tokenizer
    from bertexp.tracking import Tracker
    from bertexp.train import resolve_device, resolve_precision

    check_task(tc)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a model directory (no config.json); use e.g. RUN/checkpoints/last")
    device = resolve_device(str(trainer_cfg.device))
    precision = resolve_precision(str(trainer_cfg.precision), device)
    tokenizer = load_tokenizer(path)
    task = load_task(tc.name, data_cfg, tokenizer, seed)
    splits = task.splits()
    for split, limit in (("train", tc.train_limit), ("dev", tc.get("eval_limit")), ("test", tc.get("eval_limit"))):
        if limit is not None:  # a fixed subset (a fixed shuffle's first N), the same for every seed and run
            keep = np.random.default_rng(0).permutation(len(splits[split]))[: int(limit)]
            splits[split] = [splits[split][i] for i in sorted(keep)]
    task.train, task.dev, task.test = splits["train"], splits["dev"], splits["test"]
    base = baseline(task)
    encoded = {k: encode(task, v, tokenizer, int(tc.max_length)) for k, v in splits.items()}
    origin = pretraining_origin(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_info = {**info, "group": origin.get("pretrain/group") or info.get("group"), "tags": [*info.get("tags", []), tc.name]}
    config = {"task": OmegaConf.to_container(tc, resolve=True), **origin}
    logger = dict(logger_cfg, job_type="finetune") if logger_cfg else None
    tracker = Tracker(out_dir, logger, run_info, config, None)
    tracker.truncate_after(0)
    log.info("Fine-tuning %s on %s: %d train / %d dev / %d test examples, %d seeds, from the pretrained weights and "
             "from random init; %s baseline: dev %.4f, test %.4f", path, tc.name, len(splits["train"]),
             len(splits["dev"]), len(splits["test"]), int(tc.seeds), base["name"], base["dev"], base["test"])
    results = {"pretrained": [], "random": []}
    step0 = 0
    try:
        for init in ("pretrained", "random"):
            for s in range(1, int(tc.seeds) + 1):
                r = finetune_once(task, splits, encoded, path, init, s, tc, optim_cfg, device, precision, tracker, step0)
                step0 += r["steps"]
                results[init].append(r)
                log.info("%s, %s init, seed %d: dev %.4f, test %.4f (epoch %d)", tc.name, init, s, r["dev"], r["test"], r["epoch"])
        metric = "accuracy" if task.kind == "sequence" else "entity F1"
        summary = {"task": tc.name, "metric": metric, "baseline": base, **origin,
                   **{init: {"dev": stats([r["dev"] for r in rs]), "test": stats([r["test"] for r in rs])}
                      for init, rs in results.items()},
                   "sizes": {k: len(v) for k, v in splits.items()}}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        flat = {f"downstream/{tc.name}/{init}/{split}_{k}": summary[init][split][k]
                for init in results for split in ("dev", "test") for k in ("mean", "sd")}
        tracker.summary({**flat, f"downstream/{tc.name}/baseline/test": base["test"]})
        print(describe(summary))
        return summary
    finally:
        tracker.finish(0)


def _pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['sd']:.4f}" if s["sd"] is not None else f"{s['mean']:.4f}"


def describe(summary: dict) -> str:
    t, m = summary["task"], summary["metric"]
    n = summary["pretrained"]["test"]["n"]
    lines = [f"{t} ({m}, mean ± sd over {n} fine-tuning seeds; test at each seed's best dev epoch):",
             f"  pretrained encoder   dev {_pm(summary['pretrained']['dev'])}   test {_pm(summary['pretrained']['test'])}",
             f"  random init          dev {_pm(summary['random']['dev'])}   test {_pm(summary['random']['test'])}",
             f"  {summary['baseline']['name']:<20} dev {summary['baseline']['dev']:.4f}            test {summary['baseline']['test']:.4f}"]
    also = summary["baseline"].get("also")
    if also:
        lines.append(f"  {also['name']:<20} dev {also['dev']:.4f}            test {also['test']:.4f}")
    return "\n".join(lines)
