"""A run's W&B record as W&B users drive it: their own tags, name and notes; files that move with the run;
one tokens/s statistic everywhere; the vocabulary the model has."""
import json
import re

import pytest

from wandb_reader import inspect, summary as wandb_summary, wandb_files


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """`python run.py trainer=smoke logger.tags=[ablation] logger.name=first logger.notes=hello` (offline W&B)."""
    mp = pytest.MonkeyPatch()
    mp.setattr("bertexp.tracking.api_key_configured", lambda: False)  # as on a machine never logged in
    d = tmp_path_factory.mktemp("labelled") / "run"

    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        from conftest import run_main

        code = run_main(mp, ["trainer=smoke", "logger.mode=offline", "logger.tags=[ablation]", "logger.name=first",
                             "logger.notes=hello", f"hydra.run.dir={d}"])
    mp.undo()
    assert code == 0, err.getvalue()[-3000:]
    wandb_file = wandb_files(d)[0]  # read back once (wandb's reader takes seconds)
    return d, out.getvalue(), err.getvalue(), inspect(wandb_file)["run"], wandb_summary(wandb_file)["summary"]


def test_own_tags_name_and_notes_reach_the_wandb_run(labelled):
    _, _, _, run, _ = labelled
    assert run["display_name"] == "first" and run["notes"] == "hello"
    # the user's tag beside bertexp's own, never in their place
    assert {"ablation", "peoples_daily", "bert_tiny", "token", "mlm_nsp", "smoke"} <= set(run["tags"])
    assert run["run_group"] == "smoke"  # a single smoke run (a sweep's smoke jobs stay in the sweep's group)


def test_wandb_files_are_copies_that_move_with_the_run(labelled):
    d, out, err, _, _ = labelled
    files = wandb_files(d)[0].parent / "files"
    kept = [files / ".hydra" / "config.yaml", files / "run_config.json", files / "provenance.json"]
    assert all(p.is_file() and not p.is_symlink() for p in kept)
    assert not [p for p in files.rglob("*") if p.is_symlink()]  # nothing points back into this machine's run dir
    assert (files / "run_config.json").read_text() == (d / "run_config.json").read_text()
    assert "Symlinked" not in out + err and "Linked" not in out + err


def test_one_tokens_per_s_statistic_in_the_final_line_the_table_and_wandb(labelled):
    from bertexp.compare import load_run

    d, out, err, _, summary = labelled
    said = re.search(r"mean (\d+) tokens/s", out + err)
    assert said, (out + err)[-2000:]
    logged = summary["throughput/mean_tokens_per_s"]
    table = load_run(d)["mean_tokens_per_s"]
    assert table == pytest.approx(logged, rel=1e-9) and int(said.group(1)) == round(logged)
    # the window rate has a name of its own, and the last window is not what the summary calls the mean
    assert "throughput/window_tokens_per_s" in summary


def test_wandb_config_records_the_models_vocabulary(labelled):
    d, _, _, run, _ = labelled
    config = run["config"]["update"]["model"]
    rows = len((d / "checkpoints" / "last" / "vocab.txt").read_text(encoding="utf-8").splitlines())
    model = json.loads((d / "checkpoints" / "last" / "config.json").read_text())
    assert config["vocab_size"] == model["vocab_size"] == rows and config["max_vocab_size"] == 8000 > rows


def test_offline_line_says_to_log_in_first(labelled):
    d, out, _, _, _ = labelled
    last = [x for x in out.splitlines() if "| Run dir: " in x][-1]
    folder = wandb_files(d)[0].parent
    assert last.endswith(f"upload it with: wandb login && wandb sync {folder}")


def test_a_resume_that_names_no_labels_keeps_the_runs_own(labelled, tmp_path):
    """W&B takes a resume's tags and notes as the run's: a resume that names none keeps the ones it was given
    (kept in the run dir), and the name too."""
    import shutil

    from conftest import run_main

    d = tmp_path / "run"
    shutil.copytree(labelled[0], d, symlinks=True)
    mp = pytest.MonkeyPatch()
    try:
        code = run_main(mp, ["trainer=smoke", "logger.mode=offline", "trainer.max_steps=6",
                             "trainer.allow_changes=[trainer.max_steps]", f"hydra.run.dir={d}"])
    finally:
        mp.undo()
    assert code == 0
    resumed = inspect(sorted(wandb_files(d))[-1])["run"]
    assert resumed["run_id"] == (d / "wandb_id").read_text() == labelled[3]["run_id"]
    assert resumed["display_name"] == "first" and resumed["notes"] == "hello" and "ablation" in resumed["tags"]
