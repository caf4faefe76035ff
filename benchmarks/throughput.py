"""Training throughput on the reference workload, side by side on the same examples:

  (a) bertexp     — the training step exactly as run.py runs it (packed pairs, dynamic padding to a
                    multiple of 8, whole-batch masking, sparse MLM decoder, global-batch loss);
  (b) huggingface — what a user assembles from Hugging Face: BertForPreTraining + DataCollatorForLanguageModeling
                    + Trainer, fed the same packed NSP examples;
  (c) tutorial    — the tutorial's per-item pipeline: clause pairs (not packed), Python tokenisation and
                    masking per example, fixed padding to max_length.

Workload: People's Daily, bert_mini (hidden 256, 4 layers, 4 heads, intermediate 1024), batch 32,
max_length 128, MLM + NSP, token masking 15%. Each pipeline runs in its own process (so peak memory is its
own). Prints real tokens/s (non-padding tokens per second, median over timed steps after warm-up), the ratio
to (b), MFU against this machine's fp32 matmul throughput measured in the same run, peak memory (RSS), and
the data pipeline's share of a step.

    python benchmarks/throughput.py                    # fp32, all three
    python benchmarks/throughput.py --precision bf16   # autocast bf16 (a and b)
    python benchmarks/throughput.py --compile          # torch.compile the encoder (a)
    python benchmarks/throughput.py --profile          # where the time of one bertexp step goes

Quality at equal time (exam accuracy against seconds): benchmarks/time_to_quality.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setup(args):
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import bertexp.resolvers  # noqa: F401
    import bertexp.schema  # noqa: F401

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "data.batch_size=32", "data.max_length=128"])
    data = instantiate(cfg.data)
    spec = instantiate(cfg.model)
    tok = spec.tokenizer(data)
    data.prepare(tok, seed=0)
    n = (args.warmup + args.steps) * 32
    examples = data.epoch_examples(0)[:n]
    return cfg, data, spec, tok, examples


def timed_loop(step_fn, n_steps, warmup):
    """Run step_fn() n_steps times; returns per-step (seconds, real tokens, padded length, data seconds)."""
    out = []
    for i in range(n_steps):
        t = time.perf_counter()
        tokens, width, data_s = step_fn(i)
        if i >= warmup:
            out.append((time.perf_counter() - t, tokens, width, data_s))
    return out


def run_bertexp(args, cfg, data, spec, tok, examples):
    import torch

    from bertexp.masking import TokenMasking, Vocab
    from bertexp.modeling import PretrainingObjective, fit_attention_to_precision
    from bertexp.optim import build_optimizer

    model = spec.build(tok)
    fit_attention_to_precision(model, "cpu", args.precision)  # as run.py does
    if args.compile:
        model.bert.compile(dynamic=True)
    objective = PretrainingObjective(model)
    opt = build_optimizer(cfg.optim, model)
    masker = TokenMasking(0.15).bind(Vocab.from_tokenizer(tok))
    g = torch.Generator().manual_seed(0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else torch.autocast("cpu", enabled=False)
    params = list(model.parameters())

    def step(i):
        t = time.perf_counter()
        batch = data.collate(examples[i * 32 : (i + 1) * 32])
        ids, labels, *_ = masker(batch, g)
        data_s = time.perf_counter() - t
        n_masked = max(1, int((labels != -100).sum()))
        with amp:
            mlm, nsp, *_ = objective(ids, batch["attention_mask"], batch["token_type_ids"], labels, batch["next_sentence_label"])
        loss = mlm / n_masked + nsp / len(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()), ids.shape[1], data_s

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for i in range(3):
            step(i)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(3)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20), file=sys.stderr)
    return timed_loop(step, args.warmup + args.steps, args.warmup), model


def run_huggingface(args, cfg, data, spec, tok, examples):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    model = spec.build(tok)
    rows = hf_rows(data, tok, examples)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    seen = []

    def collate(batch):
        t = time.perf_counter()
        out = collator(batch)
        seen.append((int(out["attention_mask"].sum()), out["input_ids"].shape[1], time.perf_counter() - t))
        return out

    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bertexp-bench-hf"), per_device_train_batch_size=32,
        max_steps=args.warmup + args.steps, learning_rate=2e-3, warmup_steps=10, weight_decay=0.01,
        report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, bf16=args.precision == "bf16", seed=0, max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    # The Trainer's sampler shuffles, so the i-th timed step consumed the i-th collated batch.
    return [(t, tok_, w, d) for t, (tok_, w, d) in list(zip(times, seen))[args.warmup :]], model


def run_tutorial(args, cfg, data, spec, tok, examples):
    """The tutorial's way: text in, per-item tokenisation and per-token masking, fixed padding."""
    import random

    import torch


    model = spec.build(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids, so = data.tokens.ids, data.tokens.sent_offsets
    rng = random.Random(0)

    def text(s):
        return "".join(tok.convert_ids_to_tokens(ids[so[s] : so[s + 1]].tolist())).replace("##", "")

    # The tutorial's pairs: one clause (it splits its essay at ，。！？) and the next, or a random one;
    # not packed, so most of each fixed 128-token row is padding.
    import re

    clauses = [c for s in range(min(len(so) - 1, 20000)) for c in re.split(r"(?<=[，。！？；])", text(s)) if c]
    texts = []
    for k in range((args.warmup + args.steps) * 32):
        c = rng.randrange(len(clauses) - 1)
        nxt = rng.random() < 0.5
        texts.append((clauses[c], clauses[c + 1 if nxt else rng.randrange(len(clauses))], 0 if nxt else 1))
    vocab = list(range(len(tok)))

    def item(i):
        a, b, label = texts[i]
        enc = tok(a, b, padding="max_length", max_length=128, truncation=True)
        input_ids, labels = list(enc["input_ids"]), [-100] * 128
        for j, t in enumerate(input_ids):  # per-token Python masking
            if t in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id):
                continue
            if random.random() < 0.15:
                labels[j] = t
                r = random.random()
                if r < 0.8:
                    input_ids[j] = tok.mask_token_id
                elif r < 0.9:
                    input_ids[j] = random.choice(vocab)
        return input_ids, enc["token_type_ids"], enc["attention_mask"], labels, label

    def step(i):
        t = time.perf_counter()
        items = [item(k) for k in range(i * 32, (i + 1) * 32)]
        cols = [torch.tensor([it[c] for it in items]) for c in range(5)]
        data_s = time.perf_counter() - t
        out = model(input_ids=cols[0], token_type_ids=cols[1], attention_mask=cols[2], labels=cols[3], next_sentence_label=cols[4])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return int(cols[2].sum()), 128, data_s

    return timed_loop(step, args.warmup + args.steps, args.warmup), model


def hf_rows(data, tok, examples) -> list[dict]:
    """The packed NSP examples as the token lists a Hugging Face collator expects."""
    from bertexp.data.pairs import A0, A1, B0, B1, LABEL

    ids = data.tokens.ids
    rows = []
    for e in examples:
        a, b = ids[e[A0] : e[A1]].tolist(), ids[e[B0] : e[B1]].tolist()
        rows.append({
            "input_ids": [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id],
            "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
            "next_sentence_label": int(e[LABEL]),
        })
    return rows


def child(args) -> None:
    import torch

    cfg, data, spec, tok, examples = setup(args)
    fn = {"bertexp": run_bertexp, "huggingface": run_huggingface, "tutorial": run_tutorial}[args.pipeline]
    steps, model = fn(args, cfg, data, spec, tok, examples)
    from bertexp.train import matmul_flops

    cpu = torch.device("cpu")
    peak = matmul_flops(cpu, torch.float32, n=4096, reps=3)  # fp32: the MFU denominator the issue defines
    peak_run = matmul_flops(cpu, torch.bfloat16, n=4096, reps=3) if args.precision == "bf16" else peak
    tps = statistics.median(tokens / t for t, tokens, _, _ in steps)
    width = statistics.mean(w for _, _, w, _ in steps)
    n_enc = sum(p.numel() for p in model.bert.encoder.parameters())
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    flops_per_token = 6 * n_enc + 12 * L * H * width
    print(json.dumps({
        "pipeline": args.pipeline,
        "tokens_per_s": tps,
        "step_ms": 1000 * statistics.median(t for t, *_ in steps),
        "mean_padded_len": width,
        "mfu": flops_per_token * tps / peak,
        "mfu_at_precision": flops_per_token * tps / peak_run,
        "peak_gflops": peak / 1e9,
        "peak_gflops_at_precision": peak_run / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_share": statistics.median(d / t for t, _, _, d in steps),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--pipelines", default="bertexp,huggingface,tutorial")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per pipeline")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="bert_mini", help="model option (the reference workload is bert_mini)")
    ap.add_argument("--profile", action="store_true", help="print a profile of one bertexp step")
    ap.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pipeline:
        return child(args)
    results = {}
    for name in args.pipelines.split(","):
        cmd = [sys.executable, __file__, "--pipeline", name, "--precision", args.precision, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--model", args.model] + (["--compile"] if args.compile else []) + (["--profile"] if args.profile else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        if args.profile:
            print(out.stderr, file=sys.stderr)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results.get("huggingface", {}).get("tokens_per_s")
    import platform

    first = next(iter(results.values()), None)
    if first is None:
        print("no results")
        return
    bf16 = args.precision == "bf16"
    print(f"\n{args.model}, batch 32, max_length 128, {args.precision}{', compiled' if args.compile else ''}, "
          f"{args.threads} threads, {args.steps} timed steps; {platform.processor() or platform.machine()}, "
          f"fp32 matmul {first['peak_gflops']:.0f} GFLOP/s" + (f", bf16 {first['peak_gflops_at_precision']:.0f}" if bf16 else ""))
    extra = " | MFU vs bf16 peak" if bf16 else ""
    print(f"| pipeline | real tokens/s | vs HF | step ms | mean padded len | MFU (fp32 peak){extra} | peak RSS MB | data share |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if bf16 else ""))
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        more = f" | {r['mfu_at_precision']:.1%}" if bf16 else ""
        print(f"| {name} | {r['tokens_per_s']:.0f} | {ratio} | {r['step_ms']:.0f} | {r['mean_padded_len']:.0f} | "
              f"{r['mfu']:.1%}{more} | {r['peak_rss_mb']:.0f} | {r['data_share']:.1%} |")


if __name__ == "__main__":
    main()
