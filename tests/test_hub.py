"""model.path as a Hugging Face Hub id: resolved from the real HF cache layout (a tiny BERT, a BERT saved without
its heads and a tiny ModernBERT, written under a temporary HF_HOME), offline, for pretraining, fine-tuning and
trainer.downstream; provenance and W&B name the id and its commit; each failure is one line, fast."""
import json
import logging
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import ESSAY, ROOT, run_cli, run_here
from hub_cache import put_in_cache, tiny_bert, tiny_modernbert, use_cache

ESSAY_RUN = ["data=text_file", f"data.path={ESSAY}", "trainer=smoke", "logger=none"]
TINY_TASK = ["task.train_limit=64", "task.eval_limit=32", "task.seeds=1", "task.epochs=1", "task.max_length=32",
             "task.batch_size=16"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with three cached repos; returns (HF_HOME, {repo id: snapshot dir})."""
    src, home = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("hf_home")
    snaps = {"tiny-org/bert": put_in_cache(home, "tiny-org/bert", tiny_bert(src / "bert")),
             "tiny-org/bert-encoder": put_in_cache(home, "tiny-org/bert-encoder", tiny_bert(src / "enc", encoder_only=True)),
             "tiny-org/modernbert": put_in_cache(home, "tiny-org/modernbert", tiny_modernbert(src / "mb"))}
    (src / "nomodel").mkdir()
    (src / "nomodel" / "README.md").write_text("a dataset card, no model\n")
    snaps["tiny-org/nomodel"] = put_in_cache(home, "tiny-org/nomodel", src / "nomodel")
    return home, snaps


@pytest.fixture
def offline(hub, monkeypatch):
    import bertexp.hub

    use_cache(monkeypatch, hub[0])
    yield hub
    bertexp.hub._resolve_id.cache_clear()  # nothing resolved against this temporary cache outlives the test


def test_the_cache_layout_is_huggingface_hubs_own(hub):
    """What the tests build is what huggingface_hub's cache scanner reads as downloaded repos."""
    from huggingface_hub import scan_cache_dir

    home, snaps = hub
    repos = {r.repo_id: {rev.commit_hash for rev in r.revisions} for r in scan_cache_dir(home / "hub").repos}
    assert repos == {repo: {snap.name} for repo, snap in snaps.items()}


@pytest.mark.slow
def test_a_cached_id_trains_offline_and_provenance_names_its_commit(hub, tmp_path):
    """The acceptance command, as typed, with HF_HUB_OFFLINE=1 and an HF_HOME holding only the tiny models: it
    trains from the cached weights with their tokenizer, and provenance.json and the W&B config say which
    snapshot; an id that is not cached fails in one line within 5 seconds."""
    from transformers import AutoTokenizer

    from wandb_reader import inspect, wandb_files

    home, snaps = hub
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    r = run_cli(["model=pretrained", "model.path=tiny-org/bert", "data=text_file", "data.path=tests/data/essay.txt",
                 "trainer=smoke", "logger.mode=offline", f"hydra.run.dir={run}"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    commit = (home / "hub" / "models--tiny-org--bert" / "refs" / "main").read_text()
    model = json.loads((run / "provenance.json").read_text())["attempts"][-1]["model"]
    assert model == {"hub_id": "tiny-org/bert", "revision": "main", "commit": commit, "snapshot": str(snaps["tiny-org/bert"])}
    saved = AutoTokenizer.from_pretrained(str(run / "checkpoints" / "last"))
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(str(snaps["tiny-org/bert"])).get_vocab()
    config = inspect(wandb_files(run)[0])["run"]["config"]
    text = json.dumps(config)
    assert "tiny-org/bert" in text and commit in text

    # Within 5 seconds: the error comes before torch and transformers are imported (the seconds of a run's start),
    # with no network call (the process takes about a second on a quiet machine; the bound allows a loaded one).
    probe = ("import runpy, sys\nsys.argv = ['run.py'] + sys.argv[1:]\ntry:\n    runpy.run_path({run!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch imported:', 'torch' in sys.modules)\n").format(run=str(ROOT / "run.py"))
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, "model=pretrained", "model.path=tiny-org/absent", "trainer=smoke",
                        "logger=none", f"hydra.run.dir={tmp_path / 'absent'}"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={**os.environ, **env})
    took = time.perf_counter() - started
    assert "exit 2 torch imported: False" in r.stdout and took < 15, (took, r.stdout, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.path=tiny-org/absent: no directory "), lines
    assert "'tiny-org/absent' is not in the Hugging Face cache at HF_HOME=" + str(home) in lines[-1]
    assert "connect, or run once online, or give a directory" in lines[-1]


def test_a_cached_modernbert_id_continues_pretraining(offline, tmp_path, monkeypatch, capfd):
    from bertexp.tracking import read_metrics

    r = run_here(monkeypatch, capfd, ["model=pretrained", "model.path=tiny-org/modernbert", "objective=mlm", *ESSAY_RUN,
                                      f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "checkpoints" / "last" / "config.json").read_text())
    assert cfg["model_type"] == "modernbert" and cfg["hidden_size"] == 32  # the cached model's, not a scratch size
    assert any("train/loss" in m for m in read_metrics(tmp_path / "metrics.jsonl"))


def test_a_model_without_heads_says_which_start_random(offline, caplog):
    """The tutorial's BertModel has no MLM or NSP head: bertexp says so in its own line, naming the heads; a
    BertForPreTraining directory loads without that line."""
    from bertexp.modeling import PretrainedBert

    with caplog.at_level(logging.WARNING, logger="bertexp"):
        spec = PretrainedBert("tiny-org/bert-encoder")
        spec.build(spec.tokenizer())
    lines = [r.getMessage() for r in caplog.records if "start from random weights" in r.getMessage()]
    assert len(lines) == 1
    assert "tiny-org/bert-encoder@" in lines[0]
    assert "the MLM head (cls.predictions)" in lines[0] and "the NSP head (cls.seq_relationship)" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bertexp"):
        spec = PretrainedBert("tiny-org/bert")
        spec.build(spec.tokenizer())
    assert not [r for r in caplog.records if "random weights" in r.getMessage()]


def test_sentiment_finetunes_a_cached_id_and_records_it(offline, tmp_path, monkeypatch, capfd):
    import bertexp.finetune

    monkeypatch.setattr(bertexp.finetune, "random_cache_dir", lambda data_cfg: tmp_path / "ftcache")
    home, snaps = offline
    r = run_here(monkeypatch, capfd, ["task=sentiment", "model.path=tiny-org/bert", "logger=none", *TINY_TASK,
                                      f"hydra.run.dir={tmp_path / 'ft'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["pretrained"]["test"]["n"] == 1
    origin = bertexp.finetune.pretraining_origin(snaps["tiny-org/bert"])
    assert origin["pretrain/hub_id"] == "tiny-org/bert" and origin["pretrain/commit"] == snaps["tiny-org/bert"].name


def test_downstream_after_continued_pretraining_from_an_id(offline, tmp_path, monkeypatch, capfd):
    import bertexp.finetune

    monkeypatch.setattr(bertexp.finetune, "random_cache_dir", lambda data_cfg: tmp_path / "ftcache")
    settings = [f"+trainer.downstream_settings.{k.removeprefix('task.')}" for k in TINY_TASK]
    r = run_here(monkeypatch, capfd, ["model=pretrained", "model.path=tiny-org/bert", *ESSAY_RUN,
                                      "trainer.downstream=[sentiment]", *settings, f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "completed" and "downstream_error" not in status
    assert (tmp_path / "downstream" / "sentiment" / "summary.json").is_file()


def test_each_failure_is_its_own_line(offline, tmp_path):
    from bertexp.errors import BertexpError
    from bertexp.hub import resolve

    home, snaps = offline

    def error(*args) -> str:
        with pytest.raises(BertexpError) as e:
            resolve(*args)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error(str(tmp_path / "nowhere")) == f"model.path: directory not found: {tmp_path / 'nowhere'}"
    assert error("./nowhere").startswith("model.path: directory not found: ")
    started = time.perf_counter()
    absent = error("tiny-org/absent")
    assert time.perf_counter() - started < 1  # a cache lookup, no network
    assert f"not in the Hugging Face cache at HF_HOME={home} (HF_HUB_OFFLINE=1)" in absent
    assert "revision v2" in error("tiny-org/bert", "v2")  # the id is cached, that revision is not
    assert error("tiny-org/nomodel").startswith("model.path=tiny-org/nomodel (commit ") and "has no config.json" in error("tiny-org/nomodel")
    assert "model.revision=v2 applies to a Hugging Face Hub id" in error(str(snaps["tiny-org/bert"]), "v2")
    assert resolve("tiny-org/bert", snaps["tiny-org/bert"].name).commit == snaps["tiny-org/bert"].name  # a commit as revision


def test_an_unreachable_hub_is_told_in_seconds_and_the_cache_still_serves(offline, monkeypatch, caplog):
    """Online, with a Hub that does not answer: an id not cached fails at once with the reason; a cached one
    loads from the cache with a warning, instead of waiting on retries."""
    import bertexp.hub
    from huggingface_hub import constants

    home, snaps = offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.perf_counter()
    with pytest.raises(bertexp.hub.CheckpointError) as e:
        bertexp.hub.resolve("tiny-org/absent")
    assert time.perf_counter() - started < bertexp.hub.REACH_TIMEOUT_S + 2
    assert "the Hub (http://127.0.0.1:9) cannot be reached" in str(e.value) and f"HF_HOME={home}" in str(e.value)
    with caplog.at_level(logging.WARNING):
        assert bertexp.hub.resolve("tiny-org/bert").dir == snaps["tiny-org/bert"]
    assert any("comes from the cache" in r.getMessage() for r in caplog.records)


def test_the_readme_continued_pretraining_job_runs_on_a_cached_id(offline, tmp_path, monkeypatch, capfd):
    """The README's continued-pretraining command, on the tiny cached BERT and the essay: MLM + NSP from the
    model's own heads and tokenizer, the exam scored before the first step and after the last, and a line that
    puts the two side by side."""
    import torch
    from safetensors.torch import load_file

    from bertexp.tracking import read_metrics

    home, snaps = offline
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if "-cn continue_pretraining" in line and "bert-base-chinese" in line)
    args = shlex.split(command.split("#")[0])[2:]
    args = [a.replace("bert-base-chinese", "tiny-org/bert") if a.startswith("model.path=") else a for a in args]
    args = [f"data.path={ESSAY}" if a.startswith("data.path=") else a for a in args]
    r = run_here(monkeypatch, capfd, [*args, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.exam_pairs=64",
                                      "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "eval/mlm_acc" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    before, after = evals[0]["eval/mlm_acc"], evals[-1]["eval/mlm_acc"]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("Continued pretraining"))
    assert f"mlm_acc {before:.4f} before" in line and f"-> {after:.4f} after step 4" in line
    assert "the neighbours table" in line and "nsp_acc" in line
    assert "random weights" not in r.stderr
    cached = load_file(str(snaps["tiny-org/bert"] / "model.safetensors"))
    trained = load_file(str(tmp_path / "checkpoints" / "last" / "model.safetensors"))
    for head in ("cls.seq_relationship.weight", "cls.predictions.transform.dense.weight"):
        # 4 steps at lr 5e-5 move the pretrained heads a little; heads started afresh would be unrelated weights
        assert torch.allclose(trained[head], cached[head], atol=1e-2) and not torch.equal(trained[head], cached[head])
    vocab = (tmp_path / "checkpoints" / "last" / "vocab.txt").read_text(encoding="utf-8")
    assert vocab == (snaps["tiny-org/bert"] / "vocab.txt").read_text(encoding="utf-8")
    cfg = json.loads((tmp_path / "run_config.json").read_text())
    assert (cfg["model.path"], cfg["masking.ratio"], cfg["objective.nsp_weight"], cfg["optim.lr"]) == \
        ("tiny-org/bert", 0.15, 1.0, 5e-5)  # BERT's own recipe at a pretrained model's learning rate
    # trained longer, it still sets the end beside the exam it began with (read back from its records)
    r = run_here(monkeypatch, capfd, [*args, "trainer.max_steps=6", "trainer.eval_every=2", "trainer.exam_pairs=64",
                                      "trainer.allow_changes=[trainer.max_steps]", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("Continued pretraining"))
    assert f"mlm_acc {before:.4f} before" in line and "after step 6" in line


def test_online_answers_of_the_hub_are_told_apart(offline, monkeypatch):
    """Online (the Hub reachable), huggingface_hub's answers become one line each: no such repo, no such
    revision, a gated repo; a download brings only a BERT's files."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    import bertexp.hub

    home, snaps = offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(bertexp.hub, "_unreachable", lambda: None)
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))
    asked = []

    def answer(error):
        def snapshot_download(repo_id, **kw):
            if kw.get("local_files_only"):
                raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
            asked.append(kw.get("allow_patterns"))
            if error is None:
                return str(snaps["tiny-org/bert"])
            raise error("404 Client Error", response=response)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        bertexp.hub._resolve_id.cache_clear()

    for error, expected in ((RepositoryNotFoundError, "'org/name' is no model on the Hugging Face Hub"),
                            (RevisionNotFoundError, "model.revision=v9: no such revision of org/name"),
                            (GatedRepoError, "the repo is gated")):
        answer(error)
        with pytest.raises(bertexp.hub.CheckpointError) as e:
            bertexp.hub.resolve("org/name", "v9")
        assert expected in str(e.value) and "\n" not in str(e.value)
    answer(None)
    resolved = bertexp.hub.resolve("org/name")
    assert resolved.dir == snaps["tiny-org/bert"] and resolved.repo_id == "org/name"
    assert asked[-1] == bertexp.hub.MODEL_FILES and "*.h5" not in asked[-1]  # weights as safetensors, no TF/Flax copies
