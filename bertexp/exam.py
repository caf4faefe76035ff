"""The exam: one fixed fill-in-the-blank test that every run on the same data is scored on.

Held-out pairs are built once at a fixed length (`exam_length`, not `data.max_length`), and each pair gets
its blanks from a generator seeded by the pair itself: exactly 15% of its non-special tokens (at least one),
every blank shown as [MASK]. Nothing about the exam depends on the run's `seed`, batch size, padding,
masking strategy, ratio or replacement split, so `eval/mlm_acc` ranks runs on the same questions. And since
every blank is [MASK], no answer can be copied from the input: a rule that copies scores 0.

`exam_id` is a hash of the exam's token ids, blank positions and NSP answer key; runs with different ids took different
exams and are not ranked together (`bertexp.compare`, the sweep summary).

The counting baselines say what a model must beat before it has learned anything worth the name: the most
frequent training token, and lookup tables of neighbours counted on the training split.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from bertexp.data.pairs import A0, A1, B0, B1, LABEL
from bertexp.masking import IGNORE_INDEX

log = logging.getLogger(__name__)

BLANK_SHARE = 0.15  # of each pair's non-special tokens, the share BERT predicts; fixed so exams compare
SHORT_SEQ_PROB = 0.1  # BERT's share of shorter pairs, fixed for the exam (not data.short_seq_prob)
BASELINES_VERSION = "1"  # bumped when the counting rules change, so cached scores are recomputed


@dataclass
class Exam:
    examples: np.ndarray  # (N, 5): A range, B range, NSP label (bertexp.data.pairs columns)
    blank_rows: np.ndarray  # (K,) row of each blank
    blank_pos: np.ndarray  # (K,) its position in the row [CLS] A [SEP] B [SEP]
    length: int
    exam_id: str

    @property
    def num_pairs(self) -> int:
        return len(self.examples)

    @property
    def num_blanks(self) -> int:
        return len(self.blank_rows)

    def batches(self, data, batch_size: int) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """(batch, input ids with every blank as [MASK], labels: the answer at blanks, -100 elsewhere).
        Rows go in order of length, so a batch pads little; the score does not depend on the order."""
        order = np.argsort(_pair_lengths(self.examples), kind="stable")
        starts = np.searchsorted(self.blank_rows, np.arange(self.num_pairs + 1))
        out = []
        for i in range(0, self.num_pairs, batch_size):
            rows = order[i : i + batch_size]
            batch = data.collate(self.examples[rows])
            ids = batch["input_ids"]
            r = np.concatenate([np.full(starts[j + 1] - starts[j], k) for k, j in enumerate(rows)])
            p = np.concatenate([self.blank_pos[starts[j] : starts[j + 1]] for j in rows])
            r, p = torch.from_numpy(r.astype(np.int64)), torch.from_numpy(p.astype(np.int64))
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[r, p] = ids[r, p]
            blanked = ids.clone()
            blanked[r, p] = data.mask_id
            out.append((batch, blanked, labels))
        return out


def _pair_lengths(ex: np.ndarray) -> np.ndarray:
    return (ex[:, A1] - ex[:, A0]) + (ex[:, B1] - ex[:, B0]) + 3


def build_exam(examples: np.ndarray, tokens: np.ndarray, length: int, split_seed: int, max_pairs: int | None) -> Exam:
    """Blanks for held-out pairs `examples` (built at `length`); at most `max_pairs` of them, a fixed sample."""
    ex = np.asarray(examples)
    if max_pairs is not None and len(ex) > max_pairs:
        keep = np.random.default_rng([split_seed, length, 5]).permutation(len(ex))[:max_pairs]
        ex = ex[np.sort(keep)]
    la, lb = ex[:, A1] - ex[:, A0], ex[:, B1] - ex[:, B0]
    rows, pos = [], []
    for r in range(len(ex)):
        n = int(la[r] + lb[r])
        k = max(1, int(round(BLANK_SHARE * n)))
        # Seeded by the pair's own token ranges: its blanks do not move when other pairs come or go.
        pick = np.sort(np.random.default_rng([split_seed, int(ex[r, A0]), int(ex[r, B0]), 7]).choice(n, k, replace=False))
        pos.append(np.where(pick < la[r], 1 + pick, 2 + pick))  # skip [CLS], and [SEP] after A
        rows.append(np.full(k, r))
    blank_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    blank_pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    h = hashlib.sha1(f"exam v2 length={length}".encode())
    for r in range(len(ex)):  # the token ids each pair shows, then where its blanks are, then the NSP answers
        h.update(np.asarray(tokens[ex[r, A0] : ex[r, A1]], dtype=np.int32).tobytes() + b"|")
        h.update(np.asarray(tokens[ex[r, B0] : ex[r, B1]], dtype=np.int32).tobytes() + b"#")
    h.update(blank_rows.astype(np.int64).tobytes())
    h.update(blank_pos.astype(np.int64).tobytes())
    h.update(np.asarray(ex[:, LABEL], dtype=np.int64).tobytes())
    return Exam(ex, blank_rows.astype(np.int64), blank_pos.astype(np.int64), length, h.hexdigest()[:12])


class CountingBaselines:
    """What counting the training split scores on the exam, for every blank:

    - `most_frequent`: the most frequent training token, always;
    - `left_neighbour`: the most frequent successor of the token left of the blank;
    - `neighbours`: the most frequent middle token of (left, right), else the left neighbour's table, else
      the most frequent token.

    Neighbours are what the exam shows (an adjacent blank is [MASK], which no table has seen), so the
    tables see exactly the input the model sees.
    """

    def __init__(self, train_ids: np.ndarray, vocab_size: int):
        ids = np.asarray(train_ids, dtype=np.int64)
        v = int(vocab_size)
        self.vocab_size = v
        self.most_frequent = int(np.bincount(ids, minlength=v).argmax()) if len(ids) else 0
        self._left = _mode_table(ids[:-1], ids[1:], v)
        self._pair = _mode_table(ids[:-2] * v + ids[2:], ids[1:-1], v)

    def predict(self, left: np.ndarray, right: np.ndarray) -> dict[str, np.ndarray]:
        v = self.vocab_size
        mf = np.full(len(left), self.most_frequent, dtype=np.int64)
        by_left = _lookup(self._left, left, mf)
        return {"most_frequent": mf, "left_neighbour": by_left, "neighbours": _lookup(self._pair, left * v + right, by_left)}

    def score(self, exam_batches) -> dict[str, float]:
        """Accuracy of each rule at the exam's blanks, and of always guessing the exam's more common NSP label
        (a chunk of one sentence always gets a random next, so "random" is the more common one)."""
        correct, n, nsp = {}, 0, []
        for batch, ids, labels in exam_batches:
            nsp.append(batch["next_sentence_label"])
            r, p = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
            left = ids[r, p - 1].numpy()
            right = ids[r, (p + 1).clamp(max=ids.shape[1] - 1)].numpy()
            truth = labels[r, p].numpy()
            for name, guess in self.predict(left, right).items():
                correct[name] = correct.get(name, 0) + int((guess == truth).sum())
            n += len(truth)
        nsp_labels = torch.cat(nsp) if nsp else torch.zeros(0, dtype=torch.long)
        random_share = float(nsp_labels.float().mean()) if len(nsp_labels) else 0.5
        return {**{name: c / max(n, 1) for name, c in correct.items()}, "nsp_majority": max(random_share, 1 - random_share)}


def _mode_table(keys: np.ndarray, values: np.ndarray, v: int) -> tuple[np.ndarray, np.ndarray]:
    """For each key, its most frequent value (ties: the smaller id), as sorted (keys, values) arrays."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    combos, counts = np.unique(keys * v + values, return_counts=True)
    k, val = combos // v, combos % v
    order = np.lexsort((-counts, k))  # by key, then the highest count first
    k, val = k[order], val[order]
    first = np.concatenate([[True], k[1:] != k[:-1]])
    return k[first], val[first]


def _lookup(table: tuple[np.ndarray, np.ndarray], queries: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    keys, values = table
    if len(keys) == 0:
        return fallback.copy()
    idx = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[idx] == queries, values[idx], fallback)


def evaluate(objective, exam_batches, device, amp, dist) -> dict:
    """Score the model on the exam's blanks: accuracy, top-5 accuracy, loss and perplexity, and NSP accuracy
    on the exam's pairs where the model has an NSP head (none: no `eval/nsp_acc`, rather than a 0 that reads as
    a score). Batches are sharded over ranks and the sums reduced, so every rank gets the same."""
    from bertexp.modeling import feed

    objective.eval()
    # mlm loss sum, correct, correct in top 5, nsp correct: kept on the device, read back once; blanks and pairs
    # are counted on the CPU (a CPU number copied to the GPU with a blocking copy would wait for it)
    on_device = torch.zeros(4, dtype=torch.float64, device=device)
    counted = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), amp:
        for i, (b, ids, labels) in enumerate(exam_batches):
            if i % dist.world != dist.rank:
                continue
            inputs = feed(b, ids, labels, slice(None), device)  # blanks found on the CPU: no wait per batch
            mlm_sum, _, logits, targets, nsp_logits = objective(*inputs)
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            nsp_correct = (nsp_logits.argmax(-1) == inputs[4]).sum() if nsp_logits is not None else mlm_sum.new_zeros(())
            on_device += torch.stack([mlm_sum.double(), (top5[:, 0] == targets).sum().double(),
                                      (top5 == targets[:, None]).any(-1).sum().double(), nsp_correct.double()])
            counted += torch.tensor([float(int((labels != -100).sum())), float(len(ids) if nsp_logits is not None else 0)],
                                    dtype=torch.float64)
    objective.train()
    loss_sum, correct, top5_correct, nsp_correct, n, pairs = dist.sum(
        torch.cat([on_device, counted.to(device, non_blocking=True)]))
    mlm_loss = loss_sum / max(n, 1)
    return {
        "eval/mlm_acc": correct / max(n, 1),
        "eval/mlm_top5_acc": top5_correct / max(n, 1),
        "eval/mlm_loss": mlm_loss,
        "eval/perplexity": math.exp(min(mlm_loss, 50.0)),
        **({"eval/nsp_acc": nsp_correct / max(pairs, 1)} if objective.has_nsp else {}),
        "eval/blanks": int(n),
    }
