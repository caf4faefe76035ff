"""Masking cost against a training step: `python benchmarks/masking.py [--steps N]`.

The reference workload of the masking issue: bert_mini (hidden 256, 4 layers), batch 32, max_length 128,
People's Daily. Prints each strategy's median time per batch and its share of a median training step.
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
from bertexp.masking import NgramMasking, SpanMasking, TokenMasking, Vocab, WholeWordMasking  # noqa: E402
from bertexp.modeling import PretrainingObjective  # noqa: E402
from bertexp.optim import build_optimizer  # noqa: E402


def compose(overrides):
    from hydra import compose as hc
    from hydra import initialize_config_dir

    import bertexp.resolvers  # noqa: F401
    import bertexp.schema  # noqa: F401

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hc("config", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--batches", type=int, default=30, help="timed masking calls per strategy")
    args = ap.parse_args()
    cfg = compose(["model=bert_mini", "data.batch_size=32", "data.max_length=128"])
    data = instantiate(cfg.data)
    spec = instantiate(cfg.model)
    tok = spec.tokenizer(data)
    data.prepare(tok, seed=0)
    vocab = Vocab.from_tokenizer(tok)
    stream = data.train_batches(Position())
    batches = [next(stream)[0] for _ in range(args.batches)]

    model = spec.build(tok)
    objective = PretrainingObjective(model)
    opt = build_optimizer(cfg.optim, model)
    masker = TokenMasking().bind(vocab)
    g = torch.Generator().manual_seed(0)
    step_times = []
    for i in range(args.steps + 2):
        b = batches[i % len(batches)]
        t = time.perf_counter()
        ids, labels, _ = masker(b, g)
        mlm, nsp, *_ = objective(ids, b["attention_mask"], b["token_type_ids"], labels, b["next_sentence_label"])
        loss = mlm / max(1, int((labels != -100).sum())) + nsp / len(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up steps excluded
            step_times.append(time.perf_counter() - t)
    step = statistics.median(step_times)

    print(f"bert_mini, batch 32, max_length 128, {torch.get_num_threads()} threads: median training step {step * 1000:.0f} ms\n")
    print(f"{'strategy':<12} {'ms/batch':>10} {'share of step':>14}")
    for cls in (TokenMasking, WholeWordMasking, SpanMasking, NgramMasking):
        m = cls(0.15).bind(vocab)
        times = []
        for b in batches:
            t = time.perf_counter()
            m(b, g)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times)
        print(f"{cls.name:<12} {ms * 1000:>10.2f} {ms / step:>13.2%}")


if __name__ == "__main__":
    main()
