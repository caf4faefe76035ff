"""Masking cost per batch, every strategy, on one core: `python benchmarks/masking.py [--step]`.

Real People's Daily batches at max_length 128, batch 32 and batch 256, ratio 0.4 (the masking issue's
reference point), one thread: on a GPU a bert_base step at batch 256 takes tens of milliseconds, so masking
on the training thread must stay far below that (target: <= 3 ms per 256 x 128 batch for every strategy).
Collating (pairs -> padded tensors) is reported beside it. `--step` also times a bert_mini training step at
batch 32 on this machine and prints each strategy's share of it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402

from bertexp.data.dataset import Position  # noqa: E402
from bertexp.masking import NgramMasking, PmiMasking, SpanMasking, TokenMasking, Vocab, WholeWordMasking  # noqa: E402

TARGET_MS = 3.0


def compose(overrides):
    from hydra import compose as hc
    from hydra import initialize_config_dir

    import bertexp.resolvers  # noqa: F401
    import bertexp.schema  # noqa: F401

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hc("config", overrides=overrides)


def median_ms(fn, items, rounds: int = 1) -> float:
    """The median time per item over `items`; with several rounds, the lowest round's median (the round
    least disturbed by the rest of the machine, as timeit takes the minimum)."""
    medians = []
    for _ in range(rounds):
        times = []
        for x in items:
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
        medians.append(statistics.median(times))
    return min(medians) * 1000


def step_ms(data, spec, tok, vocab, batches) -> float:
    from bertexp.modeling import PretrainingObjective
    from bertexp.optim import build_optimizer

    model = spec.build(tok)
    objective = PretrainingObjective(model)
    opt = build_optimizer(compose(["model=bert_mini"]).optim, model)
    masker = TokenMasking().bind(vocab)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(12):
        b = batches[i % len(batches)]
        t = time.perf_counter()
        ids, labels, *_ = masker(b, g)
        mlm, nsp, *_ = objective(ids, b["attention_mask"], b["token_type_ids"], labels, b["next_sentence_label"])
        (mlm / max(1, int((labels != -100).sum())) + nsp / len(ids)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20, help="timed batches per strategy and size")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--step", action="store_true", help="also time a bert_mini training step at batch 32 (all threads)")
    args = ap.parse_args()
    cfg = compose(["model=bert_mini", "data.max_length=128"])
    data = instantiate(cfg.data)
    spec = instantiate(cfg.model)
    tok = spec.tokenizer(data)
    data.prepare(tok, seed=0)
    vocab = Vocab.from_tokenizer(tok)
    maskers = [cls(args.ratio).bind(vocab) for cls in (TokenMasking, WholeWordMasking, SpanMasking, NgramMasking, PmiMasking)]
    for m in maskers:
        m.prepare(data, tok)  # PMI: collocations (cached after the first run)

    threads = torch.get_num_threads()
    results = {}
    for bs in (32, 256):
        stream = data.train_batches(Position(), batch_size=bs)
        pairs = [data.epoch_examples(0)[i * bs : (i + 1) * bs] for i in range(args.batches)]
        batches = [next(stream)[0] for _ in range(args.batches)]
        torch.set_num_threads(1)
        results[bs] = {"collate": median_ms(data.collate, pairs, rounds=5)}
        for m in maskers:
            g = torch.Generator().manual_seed(0)
            median_ms(lambda b: m(b, g, 0.5), batches[:3])  # warm-up
            results[bs][m.name] = median_ms(lambda b: m(b, g, 0.5), batches, rounds=5)
        torch.set_num_threads(threads)
        if bs == 32:
            small_batches = batches

    step = step_ms(data, spec, tok, vocab, small_batches) if args.step else None
    print(f"People's Daily, max_length 128, ratio {args.ratio}, one thread; ms per batch (median over" f" {args.batches} batches, best of 5 rounds) "
          f"(target for every strategy: <= {TARGET_MS:g} ms at 256 x 128)\n")
    print(f"{'':<12} {'batch 32':>10} {'batch 256':>10} {'':>8}" + (f" {'share of a bert_mini step (b32)':>32}" if step else ""))
    for name in results[32]:
        ok = "" if name == "collate" else ("ok" if results[256][name] <= TARGET_MS else "SLOW")
        line = f"{name:<12} {results[32][name]:>10.2f} {results[256][name]:>10.2f} {ok:>8}"
        if step:
            line += f" {results[32][name] / step:>31.1%}"
        print(line)
    if step:
        print(f"\nbert_mini training step at batch 32 ({threads} threads): {step:.0f} ms")


if __name__ == "__main__":
    main()
