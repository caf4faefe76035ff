"""Continued pretraining: a pretrained model trained further on the user's text (python run.py -cn
continue_pretraining). What makes it worth doing is whether the model got better on the user's text, so the
run scores the exam once before its first step (trainer.eval_at_start) and ends with the two scores side by
side, beside the counting tables that the same exam gives."""
from __future__ import annotations

import logging

from bertexp.compare import standing

log = logging.getLogger("bertexp")


def exam_at_start(enabled: bool, state, evaluate, tracker, write=None) -> dict | None:
    """The exam of the model as it starts (step 0, logged like every evaluation). Not on a resume: the start was
    scored when the run began. Not a `best/` value either: those are of models this run trained."""
    if not enabled or state.step != 0:
        return None
    best = dict(state.best)
    record = evaluate()
    state.best = best
    tracker.log(record)
    acc = record["eval/mlm_acc"]
    if write is None:  # a rank other than 0 under torchrun: it evaluated its share, rank 0 speaks
        return record
    write(f"before training: exam mlm_acc {acc:.4f} ({standing(acc, record)}), top-5 {record['eval/mlm_top5_acc']:.4f}"
          + (f", nsp_acc {record['eval/nsp_acc']:.3f}" if "eval/nsp_acc" in record else ""))
    return record


def before_after(start: dict, final: dict) -> str:
    """One line: the exam before and after, and where each stands against the counting tables."""
    before, after = start["eval/mlm_acc"], final.get("final/eval/mlm_acc")
    if after is None:
        return f"Exam mlm_acc before training {before:.4f}; no evaluation after it"
    verdict = "helped" if after > before else "did not help" if after < before else "left it unchanged"
    nsp = ""
    if "eval/nsp_acc" in start and "final/eval/nsp_acc" in final:
        nsp = f"; nsp_acc {start['eval/nsp_acc']:.3f} -> {final['final/eval/nsp_acc']:.3f}"
    return (f"Continued pretraining {verdict} on this exam: mlm_acc {before:.4f} before ({standing(before, start)}) "
            f"-> {after:.4f} after step {final.get('final/step')} ({standing(after, start)}){nsp}")
