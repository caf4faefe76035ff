"""The exam: one fixed fill-in-the-blank test. Nothing can be copied from it, it does not move with any
training knob, its score equals an independent computation, and counting baselines are reported on it."""
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from bertexp.exam import BLANK_SHARE, CountingBaselines
from bertexp.masking import IGNORE_INDEX
from bertexp.tracking import read_metrics
from bertexp.train import prepare_exam
from conftest import compose, run_in_process


def _exam(overrides: list[str]):
    """Build the exam as a run with these overrides builds it."""
    cfg = compose(overrides)
    data = instantiate(cfg.data)
    spec = instantiate(cfg.model)
    data.prepare(spec.tokenizer(data), int(cfg.seed))
    exam, batches, baselines = prepare_exam(cfg, data, data.batch_size)
    return exam, batches, baselines, data


def _content(exam, batches):
    """What a pair shows and where its blanks are, independent of batching and padding."""
    rows = []
    for b, ids, labels in batches:
        for r in range(len(ids)):
            n = int(b["attention_mask"][r].sum())
            rows.append((tuple(b["input_ids"][r, :n].tolist()), tuple((labels[r, :n] != IGNORE_INDEX).nonzero().squeeze(1).tolist())))
    return sorted(rows)


def test_copying_the_input_scores_nothing_and_baselines_are_ordered():
    exam, batches, baselines, data = _exam([])
    assert exam.num_pairs > 500 and exam.num_blanks > 10_000
    shown = torch.cat([ids[labels != IGNORE_INDEX] for _, ids, labels in batches])
    answers = torch.cat([labels[labels != IGNORE_INDEX] for _, _, labels in batches])
    assert (shown == data.mask_id).all()  # every blank is [MASK]...
    assert float((shown == answers).float().mean()) == 0.0  # ...so copying the input never answers one
    # 15% of each pair's non-special tokens (rounded, at least one)
    for b, _, labels in batches[:5]:
        n = (~b["special_tokens_mask"]).sum(1)
        k = (labels != IGNORE_INDEX).sum(1)
        assert torch.equal(k, torch.clamp(torch.round(BLANK_SHARE * n.double()).long(), min=1))
    mf, left, both = (baselines[f"eval/baseline/{k}_acc"] for k in ("most_frequent", "left_neighbour", "neighbours"))
    assert 0.02 < mf < 0.08 and mf < left < both  # counting neighbours beats counting tokens
    assert both > 0.25  # the table a model must beat to claim it uses context
    # what a run logs (cached beside the tokens after the first run) is what counting gives now
    fresh = CountingBaselines(data.train_token_ids(), data.vocab_size).score(batches)
    assert baselines == {f"eval/baseline/{k}_acc": v for k, v in fresh.items()}


def test_exam_is_identical_whatever_the_training_knobs():
    ref_exam, ref_batches, ref_base, _ = _exam([])
    ref = _content(ref_exam, ref_batches)
    for ov in (  # every training knob changed at once, two ways
        ["data.batch_size=7", "data.pad_to_multiple_of=1", "masking=span", "masking.ratio=0.5", "seed=7"],
        ["data.batch_size=48", "data.pad_to_multiple_of=64", "masking=whole_word", "masking.mask_token_prob=0.5",
         "masking.random_token_prob=0.5", "data.max_length=64", "data.short_seq_prob=0.5", "objective=mlm"],
    ):
        exam, batches, base, _ = _exam(ov)
        assert exam.exam_id == ref_exam.exam_id, ov
        assert np.array_equal(exam.examples, ref_exam.examples), ov
        assert np.array_equal(exam.blank_rows, ref_exam.blank_rows) and np.array_equal(exam.blank_pos, ref_exam.blank_pos), ov
        assert _content(exam, batches) == ref, ov
        assert base == ref_base, ov
    # what defines the exam does change it
    for ov in (["data.split_seed=1"], ["trainer.exam_length=64"], ["trainer.exam_pairs=100"]):
        assert _exam(ov)[0].exam_id != ref_exam.exam_id, ov


def test_logged_accuracy_equals_an_independent_computation(tmp_path):
    """The final eval/mlm_acc of a trained checkpoint, recomputed with BertForPreTraining's own full forward
    (prediction logits at every position, read at the blanks)."""
    from transformers import BertForPreTraining

    ov = ["trainer.max_steps=12", "trainer.eval_every=12", "trainer.save_every=12", "trainer.precision=fp32",
          "objective.mlm_bias_init=unigram", "logger=none"]
    run_in_process(tmp_path, ov)
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/mlm_acc" in r][-1]
    _, batches, _, _ = _exam(["trainer=smoke", *ov])
    model = BertForPreTraining.from_pretrained(str(tmp_path / "checkpoints" / "last")).eval()
    correct = top5 = n = 0
    with torch.no_grad():
        for b, ids, labels in batches:
            logits = model(input_ids=ids, attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]).prediction_logits
            at = labels != IGNORE_INDEX
            correct += int((logits.argmax(-1)[at] == labels[at]).sum())
            top5 += int((logits.topk(5, -1).indices[at] == labels[at][:, None]).any(-1).sum())
            n += int(at.sum())
    assert logged["eval/blanks"] == n
    assert correct > 0  # a trained model, not an all-wrong one
    assert logged["eval/mlm_acc"] == pytest.approx(correct / n, abs=2 / n)
    assert logged["eval/mlm_top5_acc"] == pytest.approx(top5 / n, abs=2 / n)
    assert isinstance(logged["eval/exam_id"], str) and len(logged["eval/exam_id"]) == 12


def test_neighbour_tables_count_the_training_split():
    # "a b c" three times and "a x c" once: (a, c) -> b; after "a" comes b; after "b" comes c
    ids = np.array([1, 2, 3] * 3 + [1, 9, 3], dtype=np.int64)
    cb = CountingBaselines(ids, 10)
    got = cb.predict(np.array([1, 1, 2, 5]), np.array([3, 7, 5, 5]))
    assert got["most_frequent"].tolist() == [1, 1, 1, 1]  # 1 and 3 tie at 4; the smaller id
    assert got["left_neighbour"].tolist() == [2, 2, 3, 1]  # unseen left (5): the most frequent token
    assert got["neighbours"].tolist() == [2, 2, 3, 1]  # unseen pairs fall back to the left table
    assert cb.predict(np.array([1]), np.array([3]))["neighbours"].tolist() == [2]


def test_exam_id_covers_the_nsp_answer_key(pd_data):
    """The same questions with another NSP answer key are another exam: flipping any label changes the id."""
    from bertexp.data.pairs import LABEL
    from bertexp.exam import build_exam

    data, _ = pd_data
    examples, _ = data.heldout_examples(128, 0.1)
    exam = build_exam(examples, data.tokens.ids, 128, 0, 256)
    for rows in (slice(None), [0]):  # every label flipped, or one
        flipped = exam.examples.copy()
        flipped[rows, LABEL] = 1 - flipped[rows, LABEL]
        other = build_exam(flipped, data.tokens.ids, 128, 0, None)
        assert np.array_equal(other.blank_pos, exam.blank_pos)  # the same blanks: only the answer key moved
        assert other.exam_id != exam.exam_id
    assert build_exam(exam.examples.copy(), data.tokens.ids, 128, 0, None).exam_id == exam.exam_id
