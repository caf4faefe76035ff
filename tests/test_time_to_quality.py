"""benchmarks/time_to_quality.py's arithmetic: when a curve reaches a level, and which targets it is timed to."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.time_to_quality import LEAVE, PLATEAU, reach_cells, time_to_reach  # noqa: E402

CURVE = [(10.0, 100, 0.040), (20.0, 200, 0.050), (30.0, 300, 0.090), (40.0, 400, 0.120)]


def test_time_to_reach_interpolates_between_evaluations():
    # 0.07 lies halfway between 0.05 (20 s) and 0.09 (30 s)
    assert time_to_reach(CURVE, 0.07) == pytest.approx(25.0)
    assert time_to_reach(CURVE, 0.12) == pytest.approx(40.0)
    # already there at the first evaluation: its time, not an interpolation from an imagined 0 at 0 s
    assert time_to_reach(CURVE, 0.039) == 10.0
    assert time_to_reach(CURVE, 0.2) is None


def _result(curve, most_frequent=0.04, seconds=None):
    return {"curve": curve, "seconds": seconds or curve[-1][0], "baselines": {"most_frequent": most_frequent}}


def test_a_target_on_the_unigram_plateau_is_not_timed():
    hf = _result([(10.0, 50, 0.040), (20.0, 100, 0.041)])  # 1.03x the most frequent token
    headers, cells = reach_cells({"bertexp": _result(CURVE), "huggingface": hf})
    assert "on the plateau" in headers[0] and cells["bertexp"][0] == "-" and cells["huggingface"][0] == "-"
    # the fixed level: LEAVE x 0.04 = 0.08, reached by bertexp at 20 + 10 * (0.08 - 0.05) / 0.04 s
    assert f"{LEAVE:g}x the most frequent token" in headers[1]
    assert cells["bertexp"][1] == f"{20 + 10 * (LEAVE * 0.04 - 0.05) / 0.04:.0f}"
    assert cells["huggingface"][1] == "not in 20"


def test_a_target_off_the_plateau_is_timed_as_a_share_of_hugging_faces_time():
    final = PLATEAU * 0.04 * 2  # 0.1, clearly off the plateau
    hf = _result([(20.0, 100, 0.05), (40.0, 200, final)])
    headers, cells = reach_cells({"bertexp": _result(CURVE), "huggingface": hf})
    reach = 30 + 10 * (final - 0.09) / 0.03
    assert headers[0] == f"seconds to Hugging Face's final {final:.4f}"
    assert cells["bertexp"][0] == f"{reach:.0f} ({reach / 40:.0%} of Hugging Face's time)"
    assert cells["huggingface"][0] == "40 (100% of Hugging Face's time)"


def test_the_hugging_face_pipeline_is_never_timed_on_another_gpu_than_bertexp():
    """Trainer takes the first visible GPU: --device cuda:N (N > 0) with the Hugging Face pipeline is refused in
    one line naming CUDA_VISIBLE_DEVICES, before anything runs; cuda, cuda:0 and bertexp alone are fine."""
    from benchmarks.throughput import refuse_other_gpu

    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        refuse_other_gpu("cuda:1", "bertexp,huggingface")
    for device, pipelines in (("cuda", "bertexp,huggingface"), ("cuda:0", "huggingface"), ("cuda:1", "bertexp"),
                              ("cpu", "bertexp,huggingface,tutorial")):
        refuse_other_gpu(device, pipelines)


def test_the_hugging_face_pipeline_trains_on_fresh_pairs_each_epoch_and_takes_bertexps_exam(pd_data):
    """The reference pipeline itself: its rows run epoch after epoch through each epoch's own pairs (as run.py
    draws them), and a short run of it trains, with the threads it was given, on the default config, scored on
    the exam run.py takes."""
    import argparse
    import itertools

    import torch

    from benchmarks.throughput import hf_rows
    from benchmarks.time_to_quality import fresh_pairs, huggingface
    from bertexp.train import prepare_exam
    from conftest import compose

    data, tok = pd_data
    epoch0, epoch1 = hf_rows(data, tok, data.epoch_examples(0)), hf_rows(data, tok, data.epoch_examples(1))
    rows = list(itertools.islice(iter(fresh_pairs(data, tok)), len(epoch0) + 5))
    assert rows[: len(epoch0)] == epoch0 and rows[len(epoch0):] == epoch1[:5] and epoch1[:5] != epoch0[:5]

    threads = torch.get_num_threads()
    args = argparse.Namespace(minutes=0.02, eval_every=1000, threads=1, model="bert_tiny", device="cpu",
                              precision="fp32", out="unused")
    try:
        r = huggingface(args)
    finally:
        torch.set_num_threads(threads)
    exam, _, _ = prepare_exam(compose(), data, 32)
    assert r["exam_id"] == exam.exam_id and r["threads"] == 1
    assert r["curve"] and r["curve"][-1][1] >= 1 and r["tokens"] > 0 and 0 <= r["curve"][-1][2] <= 1
