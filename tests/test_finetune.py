"""Downstream evaluation: fine-tuning a checkpoint over seeds beside random init and the trivial baseline,
deterministically, logged as job_type=finetune; and trainer.downstream in a sweep's summary."""
import csv
import json

import pytest
import torch

from bertexp.tracking import read_metrics
from conftest import compose, run_here, run_in_process

TINY_TASK = ["task.train_limit=96", "task.eval_limit=64", "task.seeds=2", "task.epochs=1", "task.max_length=32",
             "task.batch_size=16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    run_in_process(d, ["logger=none"])
    return d / "checkpoints" / "last"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Random-init results are cached per test, not in the user's cache (where older code's may lie)."""
    import bertexp.finetune

    monkeypatch.setattr(bertexp.finetune, "random_cache_dir", lambda data_cfg: tmp_path / "ftcache")
    return tmp_path / "ftcache"


def _finetune(out, checkpoint, task, extra=(), wandb=True):
    from bertexp.finetune import run_finetune

    cfg = compose([f"task={task}", f"model.path={checkpoint}", "logger.mode=offline", *TINY_TASK, *extra])
    from omegaconf import OmegaConf

    logger = OmegaConf.to_container(cfg.logger, resolve=True) if wandb else None  # None: metrics.jsonl only
    return run_finetune(cfg.task, checkpoint, cfg.data, cfg.optim, cfg.trainer, out, logger, 0,
                        {"name": f"ft-{task}", "group": "tests", "tags": [], "notes": "", "overrides": []})


@pytest.mark.parametrize("task", ["sentiment", "ner"])
def test_finetune_reports_seeds_random_init_and_baseline_deterministically(tmp_path, checkpoint, task):
    a = _finetune(tmp_path / "a", checkpoint, task)
    b = _finetune(tmp_path / "b", checkpoint, task, ["task.reuse_random_init=false"])  # trained again, not reused
    assert a["random"]["source"] == b["random"]["source"] == ["trained", "trained"]
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


def _records(out, task, init):
    """The records of a fine-tuning dir's `init` runs (full-precision train loss per epoch, dev and test), without
    the mark of where a reused one came from."""
    return [{k: v for k, v in r.items() if k != "finetune/reused"} for r in read_metrics(out / "metrics.jsonl")
            if f"finetune/{task}/{init}/dev" in r]


def test_random_init_is_reused_across_checkpoints_of_one_architecture(tmp_path, checkpoint, capsys):
    """A random-init run does not depend on the checkpoint's weights: a second checkpoint of the same
    architecture and vocabulary reuses its results (the same numbers a fresh run gives), says so, and trains
    its pretrained runs; another setting (the lr) is another key and trains random init again."""
    earlier = checkpoint.parent / "step_0000002"  # trainer=smoke saves steps 2 and 4
    a = _finetune(tmp_path / "a", checkpoint, "sentiment")
    b = _finetune(tmp_path / "b", earlier, "sentiment")
    assert a["random"]["source"] == ["trained", "trained"] and b["random"]["source"] == ["cache", "cache"]
    assert b["pretrained"]["source"] == ["trained", "trained"] and b["pretrain/step"] == 2
    assert b["random"]["test"]["values"] == a["random"]["test"]["values"]
    # other weights, other numbers (the train loss: 64 dev examples after 6 steps can score the same accuracy)
    assert [r["train/loss"] for r in _records(tmp_path / "b", "sentiment", "pretrained")] != \
        [r["train/loss"] for r in _records(tmp_path / "a", "sentiment", "pretrained")]
    assert "random init" in (out := capsys.readouterr().out) and "(seeds 1, 2 reused from the cache)" in out
    recs = read_metrics(tmp_path / "b" / "metrics.jsonl")  # the reused runs' records are in this run's metrics
    assert sum("finetune/sentiment/random/dev" in r and r.get("finetune/reused") == "cache" for r in recs) == 2
    c = _finetune(tmp_path / "c", earlier, "sentiment", ["task.lr=5e-4"])
    assert c["random"]["source"] == ["trained", "trained"]


def test_a_reused_random_init_equals_a_fresh_one_and_another_architecture_trains_its_own(tmp_path, checkpoint):
    """The cache is checked against a fresh computation, not against itself: random init trained for one
    checkpoint and reused for another of the same architecture gives the records a run with
    task.reuse_random_init=false on that other checkpoint computes (CPU is deterministic); a checkpoint of
    another architecture (one layer instead of two) finds nothing in the cache and trains its own."""
    from transformers import BertConfig, BertForPreTraining

    from bertexp.data.tokenizer import load_tokenizer

    one = ["task.seeds=1", "task.train_limit=32", "task.eval_limit=16"]  # two steps per run: enough to tell
    earlier = checkpoint.parent / "step_0000002"  # trainer=smoke saves steps 2 and 4
    a = _finetune(tmp_path / "a", checkpoint, "sentiment", one, wandb=False)
    b = _finetune(tmp_path / "b", earlier, "sentiment", one, wandb=False)
    assert (a["random"]["source"], b["random"]["source"]) == (["trained"], ["cache"])
    reused = _records(tmp_path / "b", "sentiment", "random")
    # the same dir: its pretrained run is kept, its random init is trained afresh
    fresh = _finetune(tmp_path / "b", earlier, "sentiment", [*one, "task.reuse_random_init=false"], wandb=False)
    assert (fresh["pretrained"]["source"], fresh["random"]["source"]) == (["run dir"], ["trained"])
    assert reused and reused == _records(tmp_path / "b", "sentiment", "random")
    assert fresh["random"]["test"]["values"] == b["random"]["test"]["values"]

    other = tmp_path / "one-layer"
    config = BertConfig.from_pretrained(str(checkpoint))
    config.num_hidden_layers = 1
    BertForPreTraining(config).save_pretrained(other)
    load_tokenizer(checkpoint).save_pretrained(other)
    c = _finetune(tmp_path / "c", other, "sentiment", one, wandb=False)
    assert c["random"]["source"] == ["trained"]


def test_a_stopped_finetune_keeps_finished_seeds_and_reruns_only_the_rest(tmp_path, checkpoint, monkeypatch):
    """SIGTERM during the second fine-tuning run: the run stops after its current step with a message; the
    first run's result is on disk; the same call again runs the three others only, and gives the numbers and
    metrics of an uninterrupted job."""
    import os
    import signal

    import bertexp.finetune as ft
    from bertexp.errors import Interrupted

    real, calls, signals = ft.finetune_once, [], []

    def stopped_in_second(*args, **kw):
        calls.append(args[4:6])  # (init, seed)
        if len(calls) == 2 and not signals:
            signals.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(ft, "finetune_once", stopped_in_second)
    with pytest.raises(Interrupted, match="stopped by SIGTERM during sentiment, pretrained init, seed 2.*1 fine-tuning run"):
        _finetune(tmp_path / "a", checkpoint, "sentiment")
    assert sorted(p.name for p in (tmp_path / "a" / "seeds").iterdir()) == ["pretrained-seed1.json"]
    assert not (tmp_path / "a" / "summary.json").exists()
    calls.clear()
    again = _finetune(tmp_path / "a", checkpoint, "sentiment")
    assert calls == [("pretrained", 2), ("random", 1), ("random", 2)]
    assert again["pretrained"]["source"] == ["run dir", "trained"]
    whole = _finetune(tmp_path / "b", checkpoint, "sentiment", ["task.reuse_random_init=false"])
    for init in ("pretrained", "random"):
        assert again[init]["test"]["values"] == whole[init]["test"]["values"]
    assert read_metrics(tmp_path / "a" / "metrics.jsonl") == read_metrics(tmp_path / "b" / "metrics.jsonl")


def test_a_stopped_finetune_job_run_again_keeps_every_finished_runs_records(tmp_path, checkpoint, monkeypatch, capfd):
    """The reproduction through run.py: task=sentiment into D, SIGTERM during seed 2, the same command again. D's
    metrics.jsonl then holds what an uninterrupted job's holds (seed 1's records kept, not cut as an abandoned
    pretraining attempt's), nothing is moved to abandoned/, and the job is one W&B run."""
    import os
    import signal

    import bertexp.finetune as ft

    real, calls = ft.finetune_once, []

    def stopped_in_second(*args, **kw):
        calls.append(args[4:6])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    def job(d):
        return run_here(monkeypatch, capfd, ["task=sentiment", f"model.path={checkpoint}", "logger.mode=offline",
                                             *TINY_TASK, "task.reuse_random_init=false", f"hydra.run.dir={d}"])

    d = tmp_path / "ft"
    monkeypatch.setattr(ft, "finetune_once", stopped_in_second)
    assert job(d).returncode == 143
    seed1 = [r for r in read_metrics(d / "metrics.jsonl") if r.get("finetune/seed") == 1]
    assert seed1 and all("finetune/sentiment/pretrained/dev" in r for r in seed1)
    monkeypatch.setattr(ft, "finetune_once", real)
    r = job(d)
    assert r.returncode == 0, r.stderr[-2000:]
    records = read_metrics(d / "metrics.jsonl")
    assert [r for r in records if r.get("finetune/seed") == 1][: len(seed1)] == seed1
    assert job(tmp_path / "whole").returncode == 0
    assert records == read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert not (d / "abandoned").exists()
    runs = {p.name.rsplit("-", 1)[-1] for p in (d / "wandb").glob("offline-run-*")}
    assert runs == {(d / "wandb_id").read_text()}


def test_a_finetune_dir_refuses_other_settings_and_other_weights(tmp_path, checkpoint, monkeypatch, capfd):
    """A fine-tuning job's dir is guarded like a pretraining run's: the same command with another task.epochs is
    refused naming it, and so is the same command after the weights behind model.path changed (a checkpoint
    named `last` holds other weights once its run goes on); its results stay as they were."""
    import shutil

    weights = tmp_path / "last"
    shutil.copytree(checkpoint, weights)
    d = tmp_path / "ft"
    args = ["task=sentiment", f"model.path={weights}", "logger=none", *TINY_TASK, f"hydra.run.dir={d}"]
    assert run_here(monkeypatch, capfd, args).returncode == 0
    before = {f: (d / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    r = run_here(monkeypatch, capfd, [*args, "task.epochs=2"])
    assert r.returncode == 2 and "task.epochs: 1 -> 2" in r.stderr, r.stderr[-2000:]
    (f,) = weights.glob("*.safetensors")
    f.write_bytes(f.read_bytes()[:-8] + bytes(8))
    r = run_here(monkeypatch, capfd, args)
    assert r.returncode == 2 and "model.weights_fingerprint" in r.stderr, r.stderr[-2000:]
    assert {f: (d / f).read_bytes() for f in before} == before


def test_bad_task_settings_are_one_line_errors(tmp_path, checkpoint):
    from bertexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^task.bucket=0 must be >= 1$"):
        _finetune(tmp_path, checkpoint, "sentiment", ["task.bucket=0"])
    with pytest.raises(ConfigError, match=r"task.batch_size=200 is larger than the 96 training examples"):
        _finetune(tmp_path, checkpoint, "sentiment", ["task.batch_size=200"])


def test_downstream_scores_are_grouped_over_pretraining_seeds(tmp_path):
    """Pretraining runs that differ only in `seed`, each fine-tuned: the compare/sweep summary's group holds
    the mean ± sd over pretraining seeds of each run's downstream test mean."""
    import statistics

    from omegaconf import OmegaConf

    from bertexp import compare as cmp

    for seed in (0, 1):
        d = tmp_path / "sweep" / str(seed)
        overrides = ["logger=none", f"seed={seed}", "trainer.max_steps=2", "trainer.eval_every=2"]
        run_in_process(d, overrides)
        (d / ".hydra").mkdir(parents=True)
        OmegaConf.save(compose(["trainer=smoke", *overrides]), d / ".hydra" / "config.yaml")
        (d / "status.json").write_text(json.dumps({"status": "completed"}))
        _finetune(d / "downstream" / "sentiment", d / "checkpoints" / "last", "sentiment")
    means = [json.loads((tmp_path / "sweep" / str(s) / "downstream" / "sentiment" / "summary.json").read_text())
             ["pretrained"]["test"]["mean"] for s in (0, 1)]
    md, runs = cmp.compare([tmp_path / "sweep"], out=tmp_path / "out", with_plot=False)
    (group,) = runs[0]["groups"]
    got = group["downstream"]["sentiment"]["pretrained"]
    assert got["n"] == 2 and got["mean"] == pytest.approx(statistics.mean(means))
    assert got["sd"] == pytest.approx(statistics.stdev(means))
    assert f"{cmp._fmt(got['mean'])} ± {cmp._fmt(got['sd'])}" in md
    assert "sentiment test (pretrained) mean ± sd over seeds" in md and "(csv)" not in md
    rows = list(csv.reader((tmp_path / "out" / "comparison_groups.csv").open()))
    col = rows[0].index("sentiment test (pretrained) mean")
    assert float(rows[1][col]) == pytest.approx(statistics.mean(means))


def test_downstream_every_checkpoint_gives_a_curve(tmp_path, capsys):
    """trainer.downstream_every_checkpoint: every checkpoint on disk is fine-tuned (random init once, reused),
    the last one where the sweep summary reads it, and curve.csv holds a row per pretraining step."""
    from bertexp.job import run_downstream

    overrides = ["logger=none", "trainer.downstream=[sentiment]", "trainer.downstream_every_checkpoint=true",
                 *[f"+trainer.downstream_settings.{k.removeprefix('task.')}" for k in TINY_TASK]]
    run_in_process(tmp_path, overrides)
    out = run_downstream(compose(["trainer=smoke", *overrides]), tmp_path, {"name": "t", "group": "tests", "tags": []})
    final = json.loads((tmp_path / "downstream" / "sentiment" / "summary.json").read_text())
    early = json.loads((tmp_path / "downstream" / "sentiment" / "steps" / "step_0000002" / "summary.json").read_text())
    assert (early["pretrain/step"], final["pretrain/step"]) == (2, 4)
    assert early["random"]["source"] == ["trained", "trained"] and final["random"]["source"] == ["cache", "cache"]
    assert out["downstream/sentiment/test_mean"] == final["pretrained"]["test"]["mean"]
    rows = list(csv.reader((tmp_path / "downstream" / "sentiment" / "curve.csv").open()))
    assert [r[0] for r in rows[1:]] == ["2", "4"]
    assert float(rows[1][1]) == pytest.approx(early["pretrained"]["test"]["mean"])
    assert float(rows[2][3]) == pytest.approx(final["random"]["test"]["mean"])
    assert "by pretraining step" in capsys.readouterr().out


def test_finetune_logs_a_wandb_finetune_run_in_the_pretraining_group(tmp_path, checkpoint):
    from wandb_reader import inspect, wandb_files

    _finetune(tmp_path, checkpoint, "sentiment")
    run = inspect(wandb_files(tmp_path)[0])["run"]
    # named, grouped and tagged after the pretraining run it fine-tunes (conftest's run_in_process: "test", "tests")
    assert run["job_type"] == "finetune" and run["run_group"] == "tests"
    assert run["display_name"] == "sentiment of test step 4" and run["tags"] == ["test", "finetune", "sentiment"]
    config = json.dumps(run.get("config", {}))
    assert "pretrain/step" in config and "pretrain/wandb_id" in config


def test_task_needs_a_checkpoint(tmp_path, monkeypatch, capfd):
    r = run_here(monkeypatch, capfd, ["task=sentiment", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2 and "needs model.path" in r.stderr and "Traceback" not in r.stderr
    from bertexp.errors import ConfigError
    from bertexp.finetune import task_config

    with pytest.raises(ConfigError, match="unknown task 'sentimnet'"):  # what run_job checks before pretraining
        task_config("sentimnet")


@pytest.mark.slow
def test_sweep_with_downstream_has_scores_per_run(tmp_path, monkeypatch, capfd):
    d = tmp_path / "s"
    settings = [f"+trainer.downstream_settings.{k}" for k in TINY_TASK]
    settings = [s.replace("task.", "") for s in settings]
    r = run_here(monkeypatch, capfd, ["-m", "trainer=smoke", "logger=none", "masking.ratio=0.15,0.4",
                                      "trainer.downstream=[sentiment]", *settings, f"hydra.sweep.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    md = (d / "summary.md").read_text()
    assert "sentiment test (pretrained)" in md and "sentiment test (random init)" in md
    for run in ("0", "1"):
        s = json.loads((d / run / "downstream" / "sentiment" / "summary.json").read_text())
        assert s["pretrained"]["test"]["n"] == 2
        assert f"{s['pretrained']['test']['mean']:.4g} ± {s['pretrained']['test']['sd']:.4g}" in md
    rows = list(csv.DictReader((d / "summary.csv").read_text().splitlines()))  # for machines: numbers, in full
    by_run = {r["run"].rsplit("/", 1)[-1]: r for r in rows}
    for run in ("0", "1"):
        s = json.loads((d / run / "downstream" / "sentiment" / "summary.json").read_text())
        for stat in ("mean", "sd"):
            assert float(by_run[run][f"sentiment test (pretrained) {stat}"]) == s["pretrained"]["test"][stat]
            assert float(by_run[run][f"sentiment test (random init) {stat}"]) == s["random"]["test"][stat]


def _names_task(tokenizer, shuffled: bool = False):
    """A token-classification task a model must learn: sentences of filler characters, two in three with one
    name, 张三, always tagged B-PER I-PER (its characters never appear elsewhere). `shuffled`: each training
    sentence's tags are permuted, so nothing ties them to the name (dev and test keep the true tags)."""
    import random

    from bertexp.data.tasks import NER_LABELS, TaskData

    vocab = tokenizer.get_vocab()
    name = "张三"
    assert all(c in vocab for c in name)
    fillers = sorted(c for c in vocab if len(c) == 1 and "\u4e00" <= c <= "\u9fff" and c not in name)[:300]
    rng = random.Random(0)

    def sentences(n, shuffle):
        out = []
        for _ in range(n):
            chars = rng.choices(fillers, k=rng.randint(6, 14))
            tags = ["O"] * len(chars)
            if rng.random() < 2 / 3:
                at = rng.randint(0, len(chars))
                chars[at:at] = list(name)
                tags[at:at] = ["B-PER", "I-PER"]
            if shuffle:
                rng.shuffle(tags)
            out.append(("".join(chars), tags))
        return out

    return TaskData("ner", "token", list(NER_LABELS), sentences(160, shuffled), sentences(48, False),
                    sentences(48, False))


@pytest.mark.parametrize("shuffled", [False, True], ids=["learnable", "shuffled-labels"])
def test_ner_finetuning_learns_a_learnable_tagging(tmp_path, checkpoint, shuffled):
    """bertexp's NER fine-tuning loop (encode, finetune_once, predict, score) on a tagging it must learn: entity
    F1 near 1 on dev and test. The control, trained on the same sentences with their tags shuffled, scores near
    0: a high score there would mean the metric rewards something other than finding the entities."""
    from bertexp.data.tokenizer import load_tokenizer
    from bertexp.finetune import encode, finetune_once
    from bertexp.tracking import NullTracker

    cfg = compose(["task=ner", "task.epochs=2", "task.batch_size=16", "task.max_length=32", "task.lr=3e-3"])
    tokenizer = load_tokenizer(checkpoint)
    task = _names_task(tokenizer, shuffled)
    splits = task.splits()
    encoded = {k: encode(task, v, tokenizer, int(cfg.task.max_length)) for k, v in splits.items()}
    r = finetune_once(task, splits, encoded, checkpoint, "pretrained", 1, cfg.task, cfg.optim, torch.device("cpu"),
                      "fp32", NullTracker(), 0)
    if shuffled:
        assert r["dev"] < 0.2 and r["test"] < 0.2, r
    else:
        assert r["dev"] > 0.9 and r["test"] > 0.9, r


def test_a_task_job_ends_with_where_everything_is_and_carries_the_users_labels(tmp_path, checkpoint, monkeypatch, capfd):
    """`task=` prints pretraining's last line (score | Run dir | W&B and how to upload it), and logger.tags,
    logger.name and logger.notes reach its W&B run as they reach a pretraining run's."""
    from wandb_reader import inspect, wandb_files

    d = tmp_path / "ft"
    r = run_here(monkeypatch, capfd, ["task=sentiment", f"model.path={checkpoint}", "logger.mode=offline", *TINY_TASK,
                                      "logger.tags=[probe]", "logger.name=ft-first", "logger.notes=why", f"hydra.run.dir={d}"])
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    mean = json.loads((d / "summary.json").read_text())["pretrained"]["test"]["mean"]
    folder = wandb_files(d)[0].parent
    assert last.startswith(f"sentiment test accuracy {mean:.4f} ± ") and f" | Run dir: {d} | W&B: offline run " in last
    assert last.endswith(f"wandb sync {folder}")
    run = inspect(wandb_files(d)[0])["run"]
    assert run["display_name"] == "ft-first" and run["notes"] == "why" and run["job_type"] == "finetune"
    assert {"probe", "finetune", "sentiment"} <= set(run["tags"])
