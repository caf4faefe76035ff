"""The real CLI, as users type it: overrides, one-line errors for bad input, kill -9 / SIGTERM and resume,
and a multirun sweep with its summary. Each test is a subprocess of `python run.py` (seconds each)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bertexp.tracking import read_metrics
from conftest import ROOT, run_cli, run_here, run_in_process

pytestmark = pytest.mark.slow


def test_overrides_reach_config_optimizer_and_batches(tmp_path, monkeypatch, capfd):
    d = tmp_path / "run"
    r = run_here(monkeypatch, capfd, ["optim.lr=1e-4", "data.max_length=64", "trainer.max_steps=5", "trainer.exam_pairs=64", f"hydra.run.dir={d}", "logger=none"])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
    assert cfg.optim.lr == 1e-4 and cfg.data.max_length == 64
    assert "optim.lr=1e-4" in (d / ".hydra" / "overrides.yaml").read_text()
    state = torch.load(d / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["scheduler"]["peaks"][0] == pytest.approx(1e-4)  # the peak lr the schedule runs from
    train = [m for m in read_metrics(d / "metrics.jsonl") if "train/lr" in m]
    # a 5-step run warms up within optim.warmup_fraction of it and ends at the final lr of the configured peak
    assert train[-1]["train/lr"] == pytest.approx(1e-4 * cfg.optim.min_lr_ratio)
    assert max(m["train/max_seq_len"] for m in train) <= 64


def _bad_input_files(tmp: Path) -> None:
    """The files the README's error table (and the extra cases) name, in the directory the commands run in."""
    import shutil

    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("  \n\n \t\n")
    (tmp / "binary.dat").write_bytes(bytes(range(256)) * 10)
    (tmp / "gbk.txt").write_bytes("我的家乡在江南的一个小镇上。小镇不大，却有一条小河。".encode("gbk"))
    (tmp / "one_sentence.txt").write_text("只有一句话。")
    (tmp / "nocorpus").mkdir()
    (tmp / "nocorpus" / "weights.bin").write_bytes(b"\x00" * 16)
    (tmp / "bad.jsonl").write_text('{"text": "我们。你们。"}\n{"text": oops}\n', encoding="utf-8")
    (tmp / "tests" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "essay.txt", tmp / "tests" / "data" / "essay.txt")
    (tmp / "nocfg").mkdir()
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_text("{}")
    from transformers import BertConfig, BertForPreTraining, BertTokenizerFast

    small = BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForPreTraining(small).save_pretrained(tmp / "novocab")
    BertForPreTraining(small).save_pretrained(tmp / "mismatch")
    (tmp / "mismatch" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"我们的是在有和人"]) + "\n")
    BertTokenizerFast.from_pretrained(str(tmp / "mismatch")).save_pretrained(str(tmp / "mismatch"))


def readme_error_rows() -> list[tuple[list[str], str]]:
    """The README's error table: (the command line's arguments, the error line it shows, `…` standing for any
    text)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| `([^`]+)` \|$", section, re.M)
    return [(shlex.split(args), message) for args, message in rows]


# Bad inputs the README's table does not show, checked all the same: (arguments, a part of the error line).
EXTRA_BAD_INPUTS = [
    (["data=text_file", "data.path=nocorpus"], "no text, JSON lines or Parquet files"),
    (["data=text_file", "data.path=blank.txt"], "is empty"),
    (["data=text_file", "data.path=one_sentence.txt", "data.documents=paragraphs"],
     "data.documents='paragraphs' is not one of auto, blank_lines, lines, file"),
    (["masking.ratio=0"], "masking.ratio=0"),
    (["model=pretrained", "model.path=nocfg"], "has no config.json"),
    (["model=pretrained", "model.path=noweights"], "has no weights"),
    (["model=pretrained", "model.path=novocab"], "has no vocab.txt or tokenizer.json"),
    (["model=pretrained", "model.path=mismatch"], "vocab has 13 tokens but the model's embeddings have 8 rows"),
    (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be a positive number"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be >= 1"),
    (["data.val_fraction=0.9"], "data.val_fraction=0.9 must be in [0, 0.5]"),
]


_CASES_DRIVER = """
import json, os, runpy, sys
from hydra.core.global_hydra import GlobalHydra
for i, args in json.loads(sys.argv[1]):
    GlobalHydra.instance().clear()
    sys.argv = ["run.py", *args]
    out = os.open(os.path.join({tmp!r}, f"case{{i}}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(2); os.dup2(out, 2); os.dup2(out, 1)
    try:
        runpy.run_path(os.path.join({root!r}, "run.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # what would have been a traceback
        import traceback; traceback.print_exc(); code = 99
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved, 2); os.dup2(saved, 1); os.close(out)
    open(os.path.join({tmp!r}, f"case{{i}}.rc"), "w").write(str(code))
"""


def test_bad_inputs_give_one_line_errors(tmp_path):
    """Every row of the README's error table, run as its first column says, ends with exit 2 and exactly the
    line its second column shows; so do the extra cases. No traceback anywhere. The first two go through
    `python run.py` as typed; the rest through run.py's Hydra entry point, parsing the same command line, in
    two driver processes (one process per case would cost ~10 s of imports each)."""
    import re

    _bad_input_files(tmp_path)
    rows = readme_error_rows()
    assert len(rows) >= 15, "the README's error table was not found"
    cases = [(args, "^error: " + ".*".join(map(re.escape, message.removeprefix("error: ").split("…"))) + "$")
             for args, message in rows]
    cases += [(args, re.escape(part)) for args, part in EXTRA_BAD_INPUTS]
    common = ["logger=none", "trainer=smoke"]
    results = {}
    for i, (args, _) in enumerate(cases[:2]):
        r = run_cli([*args, f"hydra.run.dir={tmp_path}/runs/{i}", *common], cwd=tmp_path)
        results[i] = (r.stdout, r.stderr, r.returncode)
    rest = [(i, [*args, f"hydra.run.dir={tmp_path}/runs/{i}", *common]) for i, (args, _) in enumerate(cases) if i >= 2]
    driver = _CASES_DRIVER.format(root=str(ROOT), tmp=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", driver, json.dumps(rest[k::2])], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    for i, _ in rest:
        text = (tmp_path / f"case{i}.err").read_text()
        results[i] = ("", text, int((tmp_path / f"case{i}.rc").read_text()))
    for i, (args, pattern) in enumerate(cases):
        out, err, rc = results[i]
        name = " ".join(args)
        assert rc == 2, f"{name}: exit {rc}:\n{err[-1500:]}"
        assert "Traceback" not in err and "Traceback" not in out, f"{name}: traceback shown:\n{err[-1500:]}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{name}: {len(errors)} error lines:\n{err[-1500:]}"
        assert re.search(pattern, errors[0]), f"{name}: the README says {pattern!r}, the run said:\n{errors[0]}"
        assert len(errors[0]) < 400, f"{name}: message too long"


def _wait_for_step(metrics: Path, step: int, proc, timeout=240):
    t = time.time()
    while time.time() - t < timeout:
        recs = read_metrics(metrics)
        if any(r.get("step", 0) >= step and "train/loss" in r for r in recs):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


OVR = ["trainer.max_steps=30", "trainer.save_every=5", "trainer.eval_every=10", "trainer.log_every=1", "trainer.keep_checkpoints=0",
       "trainer.exam_pairs=64", "logger=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run_in_process(d, OVR)
    return [r for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r]


def _start(run_dir):
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *OVR, f"hydra.run.dir={run_dir}", "trainer.max_steps=30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_sigterm_and_kills_resume_to_exactly_the_uninterrupted_run(tmp_path, uninterrupted):
    """One run stopped three ways, each resumed by the same command: SIGTERM at step 7 (a checkpoint at the
    very step it stopped, exit 143, a message saying how to resume), kill -9 between checkpoint writes (step
    12) and right at one (step 15 saves). It ends with steps 1-30 once each, every loss equal to an
    uninterrupted run's."""
    d = tmp_path / "run"
    p = _start(d)
    _wait_for_step(d / "metrics.jsonl", 7, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and f"hydra.run.dir={d}" in err
    stopped_at = max(m["step"] for m in read_metrics(d / "metrics.jsonl"))
    assert (d / "checkpoints" / f"step_{stopped_at:07d}").is_dir()  # checkpoint at the very step it stopped
    for kill_at in (12, 15):
        p = _start(d)
        _wait_for_step(d / "metrics.jsonl", kill_at, p)
        p.kill()
        p.wait()
    r = run_cli([*OVR, f"hydra.run.dir={d}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step" in r.stdout + r.stderr
    got = [m for m in read_metrics(d / "metrics.jsonl") if "train/loss" in m]
    assert [m["step"] for m in got] == list(range(1, 31))
    for a, b in zip(uninterrupted, got):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6), a["step"]


def test_multirun_sweep_summary_and_group(tmp_path, monkeypatch, capfd):
    d = tmp_path / "sweep"
    r = run_here(monkeypatch, capfd, ["-m", "masking.ratio=0.15,0.4", "trainer=smoke", "trainer.max_steps=10", "trainer.log_every=5",
                 "trainer.eval_every=5", "trainer.save_every=10", "logger.mode=offline", "logger.tags=[abl]",
                 "logger.name=trial", f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in d.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(runs) == 2
    for run, ratio in zip(runs, (0.15, 0.4)):
        recs = [m for m in read_metrics(run / "metrics.jsonl") if "masking/realized_ratio" in m]
        mean = sum(m["masking/realized_ratio"] for m in recs) / len(recs)
        assert abs(mean - ratio) < 0.02
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
    summary = (d / "summary.md").read_text()
    assert "masking.ratio" in summary and summary.count("completed") == 2
    assert (d / "summary.csv").is_file() and (d / "summary.png").is_file()
    assert "Sweep summary" in r.stdout
    from wandb_reader import inspect, wandb_files

    groups = {inspect(wandb_files(run)[0])["run"]["run_group"] for run in runs}
    names = [inspect(wandb_files(run)[0])["run"]["display_name"] for run in runs]
    from wandb_reader import summary as wandb_summary

    for run in runs:
        files = wandb_files(run)[0]
        got = inspect(files)["run"]
        assert {"smoke", "sweep", "peoples_daily", "bert_tiny", "token", "abl"} <= set(got["tags"])  # smoke runs say so
        assert got["config"]["update"]["masking"]["strategy"] == "token"
        # the Hydra config files travel with the W&B run; the summary has each metric once per meaning
        assert (files.parent / "files" / ".hydra" / "config.yaml").is_file()
        assert (files.parent / "files" / "run_config.json").is_file()
        summary = wandb_summary(files)["summary"]
        assert "best/eval/mlm_acc" in summary and "eval/mlm_acc" in summary
        assert not [k for k in summary if k.startswith("final/")]
        # the last console line says where the run stands against the three tables, where it is and how to upload it
        last_eval = [m for m in read_metrics(run / "metrics.jsonl") if "eval/mlm_acc" in m][-1]
        acc = last_eval["eval/mlm_acc"]
        line = next(x for x in r.stdout.splitlines() if f"| Run dir: {run} |" in x)
        assert line.startswith(f"Exam mlm_acc {acc:.4f}: ")
        for name, key in (("most-frequent token", "most_frequent"), ("left-neighbour table", "left_neighbour"),
                          ("neighbours table", "neighbours")):
            table = last_eval[f"eval/baseline/{key}_acc"]
            side = line.split(" | ")[0]
            pos, mentioned = side.find(f"the {name} ({table:.4f})"), side.find("below")
            assert pos > 0 and ((acc <= table) == (mentioned != -1 and pos > mentioned)), (name, line)
        assert f"Run dir: {run} | final checkpoint: {run}/checkpoints/last" in line
        assert f"wandb sync {files.parent}" in r.stdout
    # smoke jobs of a sweep stay in the sweep's group (README): only single smoke runs go to `smoke`
    assert groups == {f"sweep masking.ratio {d.name}"}  # the swept keys (and the date, in multirun/DATE/TIME)
    assert names == ["trial: masking.ratio=0.15", "trial: masking.ratio=0.4"]  # logger.name prefixes the swept values
    summary_run = inspect(wandb_files(d)[0])["run"]  # the sweep's summary run carries the user's labels too
    assert summary_run["display_name"] == "trial summary" and {"summary", "abl"} <= set(summary_run["tags"])
    _sweep_syncs_in_one_command_from_a_copy(d, r.stdout, tmp_path)


def _sweep_syncs_in_one_command_from_a_copy(d, stdout, tmp_path):
    """The sweep prints one command that uploads all its offline runs (jobs and summary), `wandb login` first;
    a copy of the sweep folder, the original gone, still holds every file and syncs with the same command."""
    import re
    import shutil

    from wandb_reader import wandb_files

    (line,) = [x for x in stdout.splitlines() if "offline runs upload in one command" in x]
    m = re.search(r": wandb login && \(cd (\S+) && (wandb sync [^)]+)\)$", line)
    assert m and m.group(1) == str(d), line
    expected = {f.name for f in [*wandb_files(d), *(f for run in d.iterdir() if run.is_dir() for f in wandb_files(run))]}
    assert len(expected) == 3  # two jobs and the summary run
    copy = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(d, copy, symlinks=True)
    shutil.rmtree(d)  # another machine: nothing of the original is left to point at
    for files in copy.rglob("offline-run-*/files"):  # what sync uploads beside the run's records
        assert [f for f in files.rglob("*") if f.is_file()] and not [f for f in files.rglob("*") if f.is_symlink()]
    exe = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    args = m.group(2).split()[2:]
    r = subprocess.run(f"{exe} sync --dry-run {' '.join(args)}", shell=True, cwd=copy, capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"})
    listed = set(re.findall(r"(run-\w+\.wandb)", r.stdout + r.stderr))
    assert listed == expected, r.stdout + r.stderr


def test_fake_api_key_without_network_falls_back_offline(tmp_path):
    base = ["trainer.max_steps=5", "trainer.eval_every=5", "trainer.save_every=5", "trainer.measure_mfu=false", "trainer.exam_pairs=64"]
    t = time.time()
    r0 = run_cli([*base, "logger.mode=offline", f"hydra.run.dir={tmp_path}/offline"], env={"WANDB_API_KEY": ""})
    offline_s = time.time() - t
    assert r0.returncode == 0, r0.stderr[-2000:]
    t = time.time()
    r = run_cli([*base, f"hydra.run.dir={tmp_path}/fake"],
                env={"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_BASE_URL": "https://api.wandb.ai"})
    fake_s = time.time() - t
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("logging this run offline") == 1
    assert len(list((tmp_path / "fake" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert len([m for m in read_metrics(tmp_path / "fake" / "metrics.jsonl") if "train/loss" in m]) == 1
    assert fake_s - offline_s < 30, f"online fallback cost {fake_s - offline_s:.0f} s"


def test_path_errors_come_before_torch_is_imported(tmp_path):
    """A missing corpus or model directory is reported before the seconds of importing torch and transformers
    (it used to take 12 s to say a file was missing): the error is printed with torch still unimported."""
    probe = ("import runpy, sys\nsys.argv = ['run.py'] + sys.argv[1:]\ntry:\n    runpy.run_path({run!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch imported:', 'torch' in sys.modules)\n").format(run=str(ROOT / "run.py"))
    for args, expected in ((["data=text_file", f"data.path={tmp_path}/missing.txt"], "data.path: file not found"),
                           (["task=ner", f"model.path={tmp_path}/nope"], "model.path: directory not found"),
                           (["experiment=mask_ratio"], "-cd multirun_sweeps -cn mask_ratio")):
        r = subprocess.run([sys.executable, "-c", probe, *args, f"hydra.run.dir={tmp_path}/run"], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert expected in r.stderr, r.stderr[-1500:]
        assert "exit 2 torch imported: False" in r.stdout, (args, r.stdout, r.stderr[-1500:])


def test_value_range_errors_come_at_once_and_leave_no_run_dir(tmp_path):
    """`python run.py masking.ratio=1.5`, as typed (outputs/ under the working dir): one line, exit 2, torch never
    imported (about a second), and no run dir made. Likewise other values out of range."""
    probe = ("import runpy, sys\nsys.argv = ['run.py'] + sys.argv[1:]\ntry:\n    runpy.run_path({run!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch imported:', 'torch' in sys.modules)\n").format(run=str(ROOT / "run.py"))
    for args, expected in ((["masking.ratio=1.5"], "error: masking.ratio=1.5 must be in (0, 1) (exclusive)"),
                           (["optim.lr=-1e-3"], "error: optim.lr=-0.001 must be a positive number"),
                           (["trainer=smoke", "trainer.eval_every=0"], "error: trainer.eval_every=0 must be >= 1"),
                           (["optim.schedule=step"], "error: optim.schedule='step' must be one of linear, cosine, wsd"),
                           (["optim.weight_decay=nan"], "error: optim.weight_decay=nan must be >= 0")):
        # (its speed is that of a start without torch: what the probe below checks; no clock in a test)
        r = run_cli(args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip() == expected, (args, r.stderr[-1500:])
        assert not (tmp_path / "outputs").exists(), "a run dir was left behind"
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's bertexp, from any dir
        assert "exit 2 torch imported: False" in r.stdout, r.stdout + r.stderr[-1500:]
        assert not (tmp_path / "outputs").exists()
