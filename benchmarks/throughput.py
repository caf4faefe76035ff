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
    python benchmarks/throughput.py --device cuda --model bert_base --batch-size 256 --precision bf16
                                                       # on a GPU; MFU also against its dense spec peak

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

    import numpy as np

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = [] if args.data == "peoples_daily" else ["data=text_file", f"data.path={Path(args.data).resolve()}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"data.batch_size={args.batch_size}",
                                           f"data.max_length={args.max_length}", *source])
    data = instantiate(cfg.data)
    spec = instantiate(cfg.model)
    if args.scenario == "tutorial":
        spec = BertBaseChinese(spec)
    tok = spec.tokenizer(data)
    data.prepare(tok, seed=0)
    n = (args.warmup + args.steps) * args.batch_size
    epochs = [data.epoch_examples(0)]  # a short text (the tutorial's essay) has fewer pairs than the steps take
    while sum(map(len, epochs)) < n:
        epochs.append(data.epoch_examples(len(epochs)))
    examples = np.concatenate(epochs)[:n]
    return cfg, data, spec, tok, examples


class BertBaseChinese:
    """The tutorial's model: bert-base-chinese's architecture and config (BertConfig's defaults with its 21,128-entry
    vocabulary, dropout 0.1 included) with random weights, as no Hub is reachable here; the corpus tokenizer
    (its ids all fall inside the vocabulary). `python run.py model=pretrained model.path=bert-base-chinese`
    trains this config as it is, so both pipelines train it."""

    def __init__(self, spec):
        self.spec = spec

    def tokenizer(self, data):
        return self.spec.tokenizer(data)

    def build(self, tok):
        from transformers import BertConfig, BertForPreTraining

        return BertForPreTraining(BertConfig(vocab_size=21128, pad_token_id=tok.pad_token_id))


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

    from bertexp import distributed
    from bertexp.device import apply_matmul_precision, synchronize
    from bertexp.masking import TokenMasking, Vocab
    from bertexp.modeling import PretrainingObjective, fit_attention_to_precision
    from bertexp.optim import build_optimizer
    from bertexp.train import feed, wrap

    device = args.torch_device
    model = spec.build(tok).to(device)
    apply_matmul_precision(args.precision, device)  # as run.py does
    fit_attention_to_precision(model, device.type, args.precision)
    objective = PretrainingObjective(model)
    step_fn = wrap(objective, distributed.Dist(), args.compile)
    opt = build_optimizer(cfg.optim, model)
    masker = TokenMasking(0.15).bind(Vocab.from_tokenizer(tok))
    g = torch.Generator().manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    params = list(model.parameters())
    bs = args.batch_size

    def step(i):
        t = time.perf_counter()
        batch = data.collate(examples[i * bs : (i + 1) * bs])
        ids, labels, *_ = masker(batch, g)
        data_s = time.perf_counter() - t
        n_masked = max(1, int((labels != -100).sum()))
        with amp:  # the arguments as the training step passes them (bertexp.train.feed)
            mlm, nsp, *_ = step_fn(*feed(batch, ids, labels, slice(None), device, args.compile))
        loss = mlm / n_masked + nsp / len(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)  # measuring: the step's time is its device time
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

    from bertexp.device import synchronize

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            synchronize(args.torch_device)
            ends.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bertexp-bench-hf"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=2e-3, warmup_steps=10, weight_decay=0.01,
        report_to=[], logging_strategy="no", save_strategy="no", use_cpu=args.torch_device.type == "cpu", dataloader_num_workers=0,
        remove_unused_columns=False, bf16=args.precision == "bf16", tf32=args.precision == "tf32" or None, seed=0,
        max_grad_norm=1.0,
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


    from bertexp.device import synchronize

    device = args.torch_device
    model = spec.build(tok).to(device)
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
    for k in range((args.warmup + args.steps) * args.batch_size):
        c = rng.randrange(len(clauses) - 1)
        nxt = rng.random() < 0.5
        texts.append((clauses[c], clauses[c + 1 if nxt else rng.randrange(len(clauses))], 0 if nxt else 1))
    vocab = list(range(len(tok)))
    width = args.max_length  # the tutorial pads every pair to its max_length

    def item(i):
        a, b, label = texts[i]
        enc = tok(a, b, padding="max_length", max_length=width, truncation=True)
        input_ids, labels = list(enc["input_ids"]), [-100] * width
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
        items = [item(k) for k in range(i * args.batch_size, (i + 1) * args.batch_size)]
        cols = [torch.tensor([it[c] for it in items]) for c in range(5)]
        data_s = time.perf_counter() - t
        tokens = int(cols[2].sum())
        cols = [c.to(device) for c in cols]
        out = model(input_ids=cols[0], token_type_ids=cols[1], attention_mask=cols[2], labels=cols[3], next_sentence_label=cols[4])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        synchronize(device)
        return tokens, width, data_s

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

    from bertexp.device import resolve_device, spec_peak, use_device

    args.torch_device = resolve_device(args.device)
    use_device(args.torch_device)
    cfg, data, spec, tok, examples = setup(args)
    fn = {"bertexp": run_bertexp, "huggingface": run_huggingface, "tutorial": run_tutorial}[args.pipeline]
    steps, model = fn(args, cfg, data, spec, tok, examples)
    from bertexp.device import matmul_flops

    device = args.torch_device
    n = 4096 if device.type == "cpu" else 8192
    reps = 3 if device.type == "cpu" else 20
    # fp32: the MFU denominator the issue defines, timed as fp32 whatever --precision set (tf32 would time TF32)
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        peak = matmul_flops(device, torch.float32, n=n, reps=reps)
    finally:
        torch.set_float32_matmul_precision(was)
    peak_run = matmul_flops(device, torch.bfloat16, n=n, reps=reps) if args.precision == "bf16" else peak
    spec = spec_peak(device, args.precision)  # the data sheet's dense peak: MFU as published
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
        "mfu_spec": flops_per_token * tps / spec if spec else None,
        "spec_tflops": spec / 1e12 if spec else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_share": statistics.median(d / t for t, _, _, d in steps),
    }))


def refuse_other_gpu(device: str, pipelines: str) -> None:
    """Hugging Face's Trainer puts its model on the first visible GPU: `--device cuda:N` (N > 0) would time the
    two pipelines on different cards. One line, before anything runs."""
    if "huggingface" in pipelines and device.startswith("cuda:") and device != "cuda:0":
        raise SystemExit(f"error: --device {device}: Hugging Face's Trainer would run on the first visible GPU; "
                         f"choose the card with CUDA_VISIBLE_DEVICES={device.split(':', 1)[1]} and --device cuda")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--pipelines", default="bertexp,huggingface,tutorial")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                    help="tf32: fp32 with TF32 matmuls (an Ampere or later GPU)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (Hugging Face's Trainer takes the first "
                    "visible GPU: choose it with CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per pipeline")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="bert_mini", help="model option (the reference workload is bert_mini)")
    ap.add_argument("--data", default="peoples_daily", help="peoples_daily, or a text file (data=text_file)")
    ap.add_argument("--scenario", choices=["reference", "tutorial"], default="reference",
                    help="tutorial: the tutorial's own run, bert-base-chinese's config (random weights) on the essay "
                         "(tests/data/essay.txt), batch 16, max_length 25, bertexp against the tutorial pipeline")
    ap.add_argument("--profile", action="store_true", help="print a profile of one bertexp step")
    ap.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scenario == "tutorial" and not args.pipeline:
        fixed = {"model": "bert_mini", "data": "peoples_daily", "batch_size": 32, "max_length": 128, "precision": "fp32"}
        set_ = [f"--{k.replace('_', '-')}" for k, v in fixed.items() if getattr(args, k) != v]
        if set_:  # the scenario is the tutorial's own run: nothing of it may be changed on the side
            raise SystemExit(f"error: --scenario tutorial fixes its model, data, batch, length and fp32 (the tutorial "
                             f"pipeline has no autocast); drop {', '.join(set_)}")
    if args.scenario == "tutorial":
        args.model, args.data, args.batch_size, args.max_length = "bert_base", str(ROOT / "tests/data/essay.txt"), 16, 25
        if args.pipelines == ap.get_default("pipelines"):
            args.pipelines = "bertexp,tutorial"
    refuse_other_gpu(args.device, args.pipelines)
    if args.pipeline:
        return child(args)
    results = {}
    for name in args.pipelines.split(","):
        cmd = [sys.executable, __file__, "--pipeline", name, "--precision", args.precision, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--model", args.model, "--device", args.device,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--data", args.data, "--scenario", args.scenario] + (["--compile"] if args.compile else []) + (["--profile"] if args.profile else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        if args.profile:
            print(out.stderr, file=sys.stderr)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref_name = next((n for n in ("huggingface", "tutorial") if n in results), None)  # what "vs" compares with
    ref = results[ref_name]["tokens_per_s"] if ref_name else None
    import platform

    first = next(iter(results.values()), None)
    if first is None:
        print("no results")
        return
    bf16 = args.precision == "bf16"
    print(f"\n{args.model} on {Path(args.data).name}, batch {args.batch_size}, max_length {args.max_length}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{args.threads} threads, {args.steps} timed steps; {first['device'] if first['device'] != 'cpu' else platform.processor() or platform.machine()}, "
          f"fp32 matmul {first['peak_gflops']:.0f} GFLOP/s" + (f", bf16 {first['peak_gflops_at_precision']:.0f}" if bf16 else ""))
    spec = first.get("spec_tflops")
    extra = (" | MFU vs measured bf16 peak" if bf16 else "") + (f" | MFU vs dense {args.precision} spec peak" if spec else "")
    print(f"| pipeline | real tokens/s | vs {'HF' if ref_name == 'huggingface' else ref_name or '-'} | step ms | mean padded len | MFU (measured fp32 peak){extra} | peak RSS MB | data share |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if bf16 else "") + ("---|" if spec else ""))
    if spec:
        print(f"(dense {args.precision} spec peak of {first['device']}: {spec:.0f} TFLOP/s)", file=sys.stderr)
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        more = (f" | {r['mfu_at_precision']:.1%}" if bf16 else "") + (f" | {r['mfu_spec']:.1%}" if spec else "")
        print(f"| {name} | {r['tokens_per_s']:.0f} | {ratio} | {r['step_ms']:.0f} | {r['mean_padded_len']:.0f} | "
              f"{r['mfu']:.1%}{more} | {r['peak_rss_mb']:.0f} | {r['data_share']:.1%} |")


if __name__ == "__main__":
    main()
