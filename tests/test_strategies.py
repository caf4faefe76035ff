"""Every masking strategy trains on both data sources (the exam they are scored on: tests/test_exam.py)."""
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
