"""Time to quality: exam accuracy against wall-clock seconds of training, at equal time, for

  (a) bertexp      — `python run.py` as it is (the default recipe), on a time budget;
  (b) huggingface  — the same model, objective, initialisation, masking rate, replacement split and lr schedule
                     through Hugging Face's Trainer + DataCollatorForLanguageModeling (BertForPreTraining, the MLM
                     decoder on every position, static pairs), fed the same packed NSP pairs;
  (c) modernbert   — `python run.py model=modernbert_tiny objective=mlm` on the same budget.

Every pipeline trains for `--minutes` of training time (evaluations are not counted, as bertexp's
`elapsed_s` does not count them) and is scored every `--eval-every` steps on run.py's exam (held-out pairs,
15% blanks, every one [MASK]), beside the counting tables of the same exam. Writes `time_to_quality.md`
(the table, with date, commit and command), `.csv` (the curves) and `.png` (accuracy against seconds, the
counting tables as lines) to `--out`.

    pip install -e ".[bench]"                                     # (b) needs accelerate, for Trainer
    python benchmarks/time_to_quality.py                          # 10 minutes each, all three
    python benchmarks/time_to_quality.py --minutes 2 --pipelines bertexp,huggingface
    python benchmarks/time_to_quality.py --model bert_base        # (c) is then modernbert_base
    python benchmarks/time_to_quality.py --device cuda --precision bf16 --model bert_base   # on a GPU

"Seconds to reach" is given for two targets: Hugging Face's final accuracy (only when that is clearly off
the unigram plateau, at least PLATEAU x the most frequent token: below it, reaching it says only when a
pipeline left the plateau) and LEAVE x the most frequent token, a fixed level every pipeline can be timed to.
Both are interpolated between evaluations; a curve whose first evaluation is already there gets that
evaluation's time (an upper bound).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLATEAU, LEAVE = 1.25, 2.0  # multiples of the most frequent token's accuracy (see the docstring)
from bertexp.compare import TABLES  # noqa: E402

BASELINES = tuple((key, name) for key, name, _ in TABLES)  # the exam's counting tables: key, name


def run_py(args, name: str, extra: list[str]) -> dict:
    """(a) and (c): the real `python run.py`, on a time budget; its curve from metrics.jsonl."""
    from bertexp.tracking import read_metrics

    run_dir = ROOT / "outputs" / "time_to_quality" / name  # run dirs stay out of docs/ (and out of git)
    cmd = [sys.executable, str(ROOT / "run.py"), *extra, f"trainer.budget_minutes={args.minutes}", f"trainer.device={args.device}",
           f"trainer.precision={args.precision}",
           f"trainer.eval_every={args.eval_every}", "trainer.save_every=1000000", "logger=none",
           "trainer.measure_mfu=false", "trainer.resume=never", f"hydra.run.dir={run_dir}"]
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}  # as the HF child's
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **threads})
    if out.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval/mlm_acc" in r]
    train = [r for r in records if "train/loss" in r]
    return {"pipeline": name, "command": "python run.py " + " ".join(extra),
            "curve": [(r["elapsed_s"], r["step"], r["eval/mlm_acc"]) for r in evals],
            "top5": evals[-1]["eval/mlm_top5_acc"], "tokens": train[-1]["tokens"], "seconds": train[-1]["elapsed_s"],
            "exam_id": evals[-1]["eval/exam_id"], "threads": args.threads,
            "baselines": {k: evals[-1][f"eval/baseline/{k}_acc"] for k, _ in BASELINES}}


def huggingface(args) -> dict:
    """(b): the default config's model and objective through transformers' Trainer, in this process."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    import bertexp.resolvers  # noqa: F401
    import bertexp.schema  # noqa: F401
    from bertexp.distributed import Dist
    from bertexp.exam import evaluate
    from bertexp.optim import build_scheduler
    from bertexp.train import prepare_exam

    from bertexp.device import apply_matmul_precision, resolve_device, use_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    use_device(device)
    apply_matmul_precision(args.precision, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}"])
    data, spec = instantiate(cfg.data), instantiate(cfg.model)
    tok = spec.tokenizer(data)
    data.prepare(tok, int(cfg.seed))
    exam, exam_batches, baselines = prepare_exam(cfg, data, 32)
    torch.manual_seed(int(cfg.seed))  # as run.py seeds before it builds the model: the same initial weights
    model = spec.build(tok)
    objective = instantiate(cfg.objective)(model)
    objective.init_heads(data.train_token_ids())  # the same initialisation as run.py's
    from benchmarks.throughput import hf_rows

    rows = fresh_pairs(data, tok)  # each epoch's own pairs, as run.py trains on them
    first = hf_rows(data, tok, data.epoch_examples(0))
    m = cfg.masking
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=float(m.ratio), mask_replace_prob=float(m.mask_token_prob),
                                               random_replace_prob=float(m.random_token_prob))
    budget, o = args.minutes * 60, cfg.optim
    curve, clock, lr = [], {"train": 0.0, "since": None}, {}

    class TimeBudget(TrainerCallback):
        """run.py's schedule on the training time used (warm-up, then optim.schedule to min_lr_ratio), the
        exam every --eval-every steps (off the clock), and the stop when the budget is spent. The clock runs
        from one step's end to the next, so fetching and masking the batch count, as they do in run.py's
        elapsed_s."""

        def on_train_begin(self, targs, state, control, **kw):
            clock["since"] = time.perf_counter()

        def on_step_begin(self, targs, state, control, optimizer=None, **kw):
            if "schedule" not in lr:  # run.py's schedule object, on the Trainer's optimizer (made by train())
                lr["schedule"] = build_scheduler(o, trainer.optimizer)
            progress = min(1.0, clock["train"] / budget)  # where a step ends is not known ahead on a time budget
            lr["schedule"].apply(state.global_step, progress, progress)

        def on_step_end(self, targs, state, control, **kw):
            clock["train"] += time.perf_counter() - clock["since"]
            done = clock["train"] >= budget
            if state.global_step % args.eval_every == 0 or done:
                score = evaluate(objective, exam_batches, device, amp, Dist())
                curve.append((clock["train"], state.global_step, score["eval/mlm_acc"], score["eval/mlm_top5_acc"]))
                model.train()
            control.should_training_stop = done
            clock["since"] = time.perf_counter()  # the evaluation is off the clock

    class WeightedNSP(Trainer):
        """BertForPreTraining's MLM (on every position, as Hugging Face computes it) + NSP weighted as run.py does."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            labels, nsp_labels = inputs.pop("labels"), inputs.pop("next_sentence_label")
            out = model(**inputs)
            mlm = F.cross_entropy(out.prediction_logits.flatten(0, 1).float(), labels.flatten())
            nsp = F.cross_entropy(out.seq_relationship_logits.float(), nsp_labels)
            loss = objective.loss(mlm, nsp)
            return (loss, out) if return_outputs else loss

    targs = TrainingArguments(
        output_dir=str(ROOT / "outputs" / "time_to_quality" / "huggingface"), per_device_train_batch_size=int(cfg.data.batch_size),
        max_steps=10**7, learning_rate=float(o.lr), weight_decay=float(o.weight_decay),
        adam_beta1=float(o.optimizer.betas[0]), adam_beta2=float(o.optimizer.betas[1]), adam_epsilon=float(o.optimizer.eps),
        max_grad_norm=float(o.grad_clip), lr_scheduler_type="constant", report_to=[], logging_strategy="no",
        save_strategy="no", use_cpu=device.type == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
        seed=int(cfg.seed), bf16=args.precision == "bf16",  # TF32: apply_matmul_precision above, one API
    )
    trainer = WeightedNSP(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[TimeBudget()])
    trainer.train()
    tokens = trainer.state.global_step * int(cfg.data.batch_size) * float(sum(len(r["input_ids"]) for r in first)) / len(first)
    return {"pipeline": "huggingface", "command": "Trainer + DataCollatorForLanguageModeling, the default config",
            "threads": torch.get_num_threads(),
            "curve": [c[:3] for c in curve], "top5": curve[-1][3], "tokens": tokens, "seconds": clock["train"],
            "exam_id": exam.exam_id, "baselines": {k: baselines[f"eval/baseline/{k}_acc"] for k, _ in BASELINES}}


def fresh_pairs(data, tok):
    """The Hugging Face pipeline's training rows: epoch after epoch, each epoch's own NSP pairs in its own order
    (`data.epoch_examples(e)`), as run.py draws them, not epoch 0's pairs over and over."""
    import torch

    from benchmarks.throughput import hf_rows

    class Epochs(torch.utils.data.IterableDataset):
        def __iter__(self):
            epoch = 0
            while True:
                yield from hf_rows(data, tok, data.epoch_examples(epoch))
                epoch += 1

    return Epochs()


def time_to_reach(curve: list, target: float) -> float | None:
    """Training seconds at which a curve of (seconds, step, accuracy) first reaches `target`, linear between
    evaluations; the first evaluation's time if it is already there (nothing is known before it); None if
    the curve never gets there."""
    prev = None
    for point in curve:
        if point[2] >= target:
            if prev is None:
                return point[0]
            (t0, _, a0), (t1, _, a1) = prev[:3], point[:3]
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
        prev = point
    return None


def reach_cells(results: dict) -> tuple[list[str], dict]:
    """The 'seconds to reach' columns: (headers, {pipeline: cells})."""
    first = next(iter(results.values()))
    most_frequent = first["baselines"]["most_frequent"]
    targets = []
    hf = results.get("huggingface")
    if hf:
        final = hf["curve"][-1][2]
        if final >= PLATEAU * most_frequent:
            targets.append((f"seconds to Hugging Face's final {final:.4f}", final, hf["seconds"]))
        else:
            targets.append((f"seconds to Hugging Face's final {final:.4f} (on the plateau: < {PLATEAU:g}x the most "
                            "frequent token, not timed)", None, None))
    level = LEAVE * most_frequent
    targets.append((f"seconds to {LEAVE:g}x the most frequent token ({level:.4f})", level, None))
    cells = {}
    for name, r in results.items():
        row = []
        for _, target, hf_seconds in targets:
            reach = time_to_reach(r["curve"], target) if target is not None else None
            if target is None:
                row.append("-")
            elif reach is None:
                row.append(f"not in {r['seconds']:.0f}")
            else:
                share = f" ({reach / hf_seconds:.0%} of Hugging Face's time)" if hf_seconds else ""
                row.append(f"{reach:.0f}{share}")
        cells[name] = row
    return [t[0] for t in targets], cells


def report(args, results: dict) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    first = next(iter(results.values()))
    exams = {r["exam_id"] for r in results.values()}
    if len(exams) != 1:
        raise RuntimeError(f"the pipelines were scored on different exams ({', '.join(sorted(exams))}): not comparable")
    headers, cells = reach_cells(results)
    lines = [f"Measured {date.today()} at commit {commit}{' (with local changes)' if dirty else ''}, "
             f"{os.cpu_count()} CPU cores: `python benchmarks/time_to_quality.py --threads {args.threads} "
             f"--minutes {args.minutes:g} --eval-every {args.eval_every} --model {args.model} --device {args.device} --precision {args.precision}`. "
             f"Each pipeline trains for {args.minutes:g} minutes of training time on People's Daily ({args.device}, "
             f"{args.precision}) and is scored on exam "
             f"{first['exam_id']}.", "",
             "| pipeline | torch threads | steps | tokens/s | final exam accuracy | top-5 | " + " | ".join(headers) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(headers)]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('threads', '?')} | {r['curve'][-1][1]} | {r['tokens'] / max(r['seconds'], 1e-9):.0f} | "
                     f"{r['curve'][-1][2]:.4f} | {r['top5']:.4f} | " + " | ".join(cells[name]) + " |")
    b = first["baselines"]
    lines += ["", "Counting the training split on the same blanks: " + ", ".join(f"{label} {b[k]:.4f}" for k, label in BASELINES) + "."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        ax.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], marker="o", label=name)
    first = next(iter(results.values()))
    for (k, label), style in zip(BASELINES, (":", "--", "-.")):
        ax.axhline(first["baselines"][k], color="gray", linestyle=style, label=label)
    ax.set(xlabel="training seconds (evaluations not counted)", ylabel="exam accuracy (every blank [MASK])",
           title="Time to quality on People's Daily, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--minutes", type=float, default=10.0, help="training minutes per pipeline")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between exam evaluations")
    ap.add_argument("--pipelines", default="bertexp,huggingface,modernbert")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="bert_tiny", help="a bert_* model option; (c) trains modernbert_* of its size")
    ap.add_argument("--device", default="cpu", help="trainer.device of every pipeline: cpu | cuda | cuda:N (Hugging "
                    "Face's Trainer takes the first visible GPU: choose it with CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32", help="trainer.precision")
    ap.add_argument("--out", default=str(ROOT / "docs" / "time_to_quality"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from benchmarks.throughput import refuse_other_gpu

    refuse_other_gpu(args.device, args.pipelines)
    if not args.model.startswith("bert_") or not (ROOT / "conf" / "model" / f"{args.model}.yaml").is_file():
        raise SystemExit(f"error: --model {args.model!r}: expected a bert_* option of conf/model/ (bert_tiny, bert_mini, "
                         "bert_small, bert_base)")
    if args.child:  # (b) in its own process, like the others
        print(json.dumps(huggingface(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.pipelines.split(","):
        print(f"running {name} for {args.minutes:g} minutes ...", file=sys.stderr, flush=True)
        if name == "bertexp":
            results[name] = run_py(args, name, [f"model={args.model}"])
        elif name == "modernbert":
            results[name] = run_py(args, name, [f"model=modern{args.model}", "objective=mlm"])
        elif name == "huggingface":
            out = subprocess.run([sys.executable, __file__, "--child", "huggingface", "--minutes", str(args.minutes),
                                  "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--out", args.out,
                                  "--model", args.model, "--device", args.device, "--precision", args.precision],
                                 capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                raise RuntimeError(f"huggingface failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            raise SystemExit(f"error: --pipelines: unknown pipeline {name!r} (bertexp, huggingface, modernbert)")
    table = report(args, results)
    out = Path(args.out)
    (out / "time_to_quality.md").write_text(table + "\n\n![time to quality](time_to_quality.png)\n", encoding="utf-8")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["pipeline", "train_seconds", "step", "exam_mlm_acc"])
    writer.writerows([name, *point] for name, r in results.items() for point in r["curve"])
    (out / "time_to_quality.csv").write_text(buf.getvalue(), encoding="utf-8")
    plot(results, out / "time_to_quality.png")
    print(table)
    print(f"\nWritten: {out}/time_to_quality.md, .csv, .png")


if __name__ == "__main__":
    main()
