"""Downstream evaluation: fine-tuning a checkpoint over seeds beside random init and the trivial baseline,
deterministically, logged as job_type=finetune; and trainer.downstream in a sweep's summary."""
import json

import pytest

from bertexp.tracking import read_metrics
from conftest import compose, run_cli, run_in_process

TINY_TASK = ["task.train_limit=96", "task.eval_limit=64", "task.seeds=2", "task.epochs=1", "task.max_length=32",
             "task.batch_size=16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    run_in_process(d, ["logger=none"])
    return d / "checkpoints" / "last"


def _finetune(out, checkpoint, task, extra=()):
    from bertexp.finetune import run_finetune

    cfg = compose([f"task={task}", f"model.path={checkpoint}", "logger.mode=offline", *TINY_TASK, *extra])
    from omegaconf import OmegaConf

    return run_finetune(cfg.task, checkpoint, cfg.data, cfg.optim, cfg.trainer, out,
                        OmegaConf.to_container(cfg.logger, resolve=True), 0, {"name": f"ft-{task}", "group": "tests",
                                                                              "tags": [], "notes": "", "overrides": []})


@pytest.mark.parametrize("task", ["sentiment", "ner"])
def test_finetune_reports_seeds_random_init_and_baseline_deterministically(tmp_path, checkpoint, task):
    a = _finetune(tmp_path / "a", checkpoint, task)
    b = _finetune(tmp_path / "b", checkpoint, task)
    for init in ("pretrained", "random"):
        for split in ("dev", "test"):
            s = a[init][split]
            assert s["n"] == 2 and s["sd"] is not None and 0.0 <= s["mean"] <= 1.0
            assert s["values"] == b[init][split]["values"]  # the same seeds give the same numbers on CPU
    if task == "sentiment":  # (96 NER sentences and 6 steps tag everything O either way: F1 0)
        assert a["pretrained"]["dev"]["values"] != a["random"]["dev"]["values"]
    assert 0.0 < a["baseline"]["test"] < 1.0 and a["sizes"] == {"train": 96, "dev": 64, "test": 64}
    assert a["metric"] == ("accuracy" if task == "sentiment" else "entity F1")
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert saved["pretrained"]["test"]["values"] == a["pretrained"]["test"]["values"]
    recs = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert any(f"finetune/{task}/pretrained/test" in r for r in recs) and any(f"finetune/{task}/random/dev" in r for r in recs)
    assert a["pretrain/step"] == 4 and a["pretrain/checkpoint"] == str(checkpoint)  # trainer=smoke: 4 steps


def test_finetune_logs_a_wandb_finetune_run_in_the_pretraining_group(tmp_path, checkpoint):
    from wandb_reader import inspect, wandb_files

    _finetune(tmp_path, checkpoint, "sentiment")
    run = inspect(wandb_files(tmp_path)[0])["run"]
    assert run["job_type"] == "finetune" and run["run_group"] == "default"  # the pretraining run's experiment
    config = json.dumps(run.get("config", {}))
    assert "pretrain/step" in config and "pretrain/wandb_id" in config


def test_task_needs_a_checkpoint(tmp_path):
    r = run_cli(["task=sentiment", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2 and "needs model.path" in r.stderr and "Traceback" not in r.stderr
    from bertexp.errors import ConfigError
    from bertexp.finetune import task_config

    with pytest.raises(ConfigError, match="unknown task 'sentimnet'"):  # what run_job checks before pretraining
        task_config("sentimnet")


@pytest.mark.slow
def test_sweep_with_downstream_has_scores_per_run(tmp_path):
    d = tmp_path / "s"
    settings = [f"+trainer.downstream_settings.{k}" for k in TINY_TASK]
    settings = [s.replace("task.", "") for s in settings]
    r = run_cli(["-m", "trainer=smoke", "logger=none", "masking.ratio=0.15,0.4", "trainer.downstream=[sentiment]",
                 *settings, f"hydra.sweep.dir={d}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (d / "summary.md").read_text()
    assert "sentiment test (pretrained)" in md and "sentiment test (random init)" in md
    for run in ("0", "1"):
        s = json.loads((d / run / "downstream" / "sentiment" / "summary.json").read_text())
        assert s["pretrained"]["test"]["n"] == 2
        assert f"{s['pretrained']['test']['mean']:.4g} ± {s['pretrained']['test']['sd']:.4g}" in md
