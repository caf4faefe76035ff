"""benchmarks/out_of_domain.py on a checkpoint run.py wrote: the checkpoint's own run config (with the records
bertexp adds to it, such as the corpus fingerprint) gives the counting tables' training split."""
import subprocess
import sys

from conftest import ROOT, run_in_process


def test_out_of_domain_scores_a_run_checkpoint_beside_the_tables(tmp_path):
    run_in_process(tmp_path / "run", ["logger=none"])
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "out_of_domain.py"), str(ckpt), "--draws", "1",
                        "--reviews", "50"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| essay", "| product reviews"))]
    assert len(rows) == 2, r.stdout
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        scores = [float(c) for c in cells[3:7]]  # checkpoint, most frequent, left-neighbour, neighbours
        assert all(0 <= s <= 1 for s in scores), row
