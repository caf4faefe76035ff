"""Every masking strategy trains on both data sources; evaluation is the same fixed masking in every run."""
import pytest

from bertexp.tracking import read_metrics
from conftest import ESSAY, run_in_process

SOURCES = {
    "peoples_daily": [],
    "text_file": ["data=text_file", f"data.path={ESSAY}", "data.max_length=25", "data.batch_size=16"],
}


@pytest.mark.parametrize("strategy", ["whole_word", "span", "ngram"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_strategy_runs_and_logs_realized_ratio(tmp_path, strategy, source):
    final = run_in_process(tmp_path, [f"masking={strategy}", "masking.ratio=0.3", "trainer.max_steps=6",
                                      "trainer.log_every=3", "logger=none", *SOURCES[source]])
    assert final["final/step"] == 6
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "masking/realized_ratio" in r]
    assert len(recs) == 2 and all(abs(r["masking/realized_ratio"] - 0.3) < 0.05 for r in recs)


def test_eval_masking_is_fixed_across_strategy_ratio_and_seed(tmp_path):
    runs = [
        ["masking=token", "masking.ratio=0.15", "seed=1"],
        ["masking=span", "masking.ratio=0.6", "seed=2"],
    ]
    evals = []
    for i, ov in enumerate(runs):
        run_in_process(tmp_path / str(i), [*ov, "trainer.max_steps=2", "logger=none"])
        evals.append([r for r in read_metrics(tmp_path / str(i) / "metrics.jsonl") if "eval/mlm_acc" in r][-1])
    assert evals[0]["eval/masked_tokens"] == evals[1]["eval/masked_tokens"] > 500
    assert evals[0]["eval/baseline_acc"] == evals[1]["eval/baseline_acc"]
    assert abs(evals[0]["eval/masked_tokens"] / (64 * 119) - 0.15) < 0.03  # token masking at eval_mask_ratio
