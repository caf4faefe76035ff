"""Downstream evaluation never tests on pretraining text, and never costs a pretraining run its results:
NER follows the checkpoint's own pretraining split (or refuses), its preconditions are checked before
pretraining starts, and a downstream failure leaves the pretraining run completed."""
import json
import logging
import shutil

import numpy as np
import pytest

from conftest import ESSAY, compose, run_in_process, run_main

TINY_NER = ["task.train_limit=64", "task.eval_limit=32", "task.seeds=1", "task.epochs=1", "task.max_length=32",
            "task.batch_size=16"]


def _status(d):
    return json.loads((d / "status.json").read_text())


def test_ner_tests_on_the_documents_the_checkpoint_held_out(tmp_path, monkeypatch):
    """A checkpoint pretrained with data.split_seed=1, fine-tuned with task=ner (whose command's data says
    split_seed=0): NER's dev and test are documents split 1 held out, and status.json records that split. A
    split typed on the command line that differs from the checkpoint's is refused in one line."""
    from hydra.utils import instantiate

    import bertexp.data.tasks as tasks
    from bertexp.data.tokenizer import load_tokenizer

    pre = tmp_path / "pre"
    run_in_process(pre, ["logger=none", "data.split_seed=1"])
    ckpt = pre / "checkpoints" / "last"
    seen = {}
    real = tasks.load_ner

    def load_ner(data):
        seen["task"] = real(data)
        return seen["task"]

    monkeypatch.setattr(tasks, "load_ner", load_ner)
    ft = tmp_path / "ft"
    assert run_main(monkeypatch, ["task=ner", f"model.path={ckpt}", "logger=none", *TINY_NER, f"hydra.run.dir={ft}"]) == 0
    assert _status(ft)["pretrain_split"] == {"from": str(ckpt), "path": None, "split_seed": 1, "val_fraction": 0.05}
    assert json.loads((ft / "summary.json").read_text())["pretrain_split"]["split_seed"] == 1
    # independently: the documents pretraining at split 1 trained on
    data = instantiate(compose(["data.split_seed=1"]).data)
    data.prepare(load_tokenizer(ckpt), 0)
    trained_on = set(tasks._doc_index(np.asarray(data.tokens.doc_offsets), data._train_sents))
    ner = seen["task"]
    assert ner.doc_ids["dev"] and ner.doc_ids["test"]
    assert not (set(ner.doc_ids["dev"]) | set(ner.doc_ids["test"])) & trained_on
    # the split typed on the command line must be the checkpoint's
    code = run_main(monkeypatch, ["task=ner", f"model.path={ckpt}", "logger=none", *TINY_NER, "data.split_seed=0",
                                  f"hydra.run.dir={tmp_path / 'ft0'}"])
    assert code == 2


def test_ner_on_a_checkpoint_of_another_corpus_is_refused(tmp_path, monkeypatch, capsys):
    pre = tmp_path / "essay"
    run_in_process(pre, ["logger=none", "data=text_file", f"data.path={ESSAY}", "data.max_length=32",
                         "data.batch_size=8", "model.vocab_size=500"])
    code = run_main(monkeypatch, ["task=ner", f"model.path={pre}/checkpoints/last", "logger=none", *TINY_NER,
                                  f"hydra.run.dir={tmp_path / 'ft'}"])
    err = capsys.readouterr().err
    assert code == 2
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    assert "task=ner" in line and "not People's Daily" in line


def test_downstream_preconditions_are_checked_before_pretraining(tmp_path, monkeypatch, capsys):
    """trainer.downstream=[ner] on another corpus, or an unknown downstream setting: refused at once, before
    any pretraining step (it used to fail after the whole run)."""
    import bertexp.train

    def never(*a, **k):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(bertexp.train, "run_training", never)
    for args, expected in (
        (["data=text_file", f"data.path={ESSAY}", "trainer.downstream=[ner]"], "needs data=peoples_daily"),
        (["trainer.downstream=[sentiment]", "+trainer.downstream_settings.epochz=1"], "unknown setting 'epochz'"),
        (["trainer.downstream=[sentiment]", "+trainer.downstream_settings.epochs=0"], "task.epochs=0"),
        (["trainer.downstream=[ner]", "data.val_fraction=0"], "data.val_fraction=0 holds out none"),
    ):
        code = run_main(monkeypatch, [*args, "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path / 'r'}"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err, (args, err[-1000:])


def test_a_downstream_failure_keeps_the_pretraining_results(tmp_path, monkeypatch):
    """A sweep over two seeds whose downstream evaluation crashes: both jobs stay completed (their pretraining
    results count in the seed group), the error is shown beside them, and the sweep exits 1."""
    import bertexp.finetune
    from bertexp.compare import compare

    def broken(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(bertexp.finetune, "run_finetune", broken)
    d = tmp_path / "sweep"
    code = run_main(monkeypatch, ["-m", "seed=1,2", "trainer=smoke", "trainer.max_steps=2", "logger=none",
                                  "trainer.downstream=[sentiment]", f"hydra.sweep.dir={d}"])
    assert code == 1
    for job in ("0", "1"):
        status = _status(d / job)
        assert status["status"] == "completed" and "disk full" in status["downstream_error"]
        assert status["result"] is not None
    _, runs = compare([d], out=tmp_path / "cmp", with_plot=False)
    (group,) = runs[0]["groups"]
    assert group["n"] == 2 and group["left_out"] == 0
    assert "disk full" in (d / "summary.md").read_text()


def test_ner_follows_the_whole_lineage_of_a_continued_checkpoint(tmp_path, caplog, monkeypatch, capsys):
    """A (split 1) continued as B with data.split_seed=2: documents B holds out may be ones A trained on, so
    task=ner on B is refused, naming A; continued on A's own split it is allowed. A model bertexp did not
    pretrain, continued for two steps, still warns that its pretraining may have seen NER's dev and test."""
    from bertexp.errors import ConfigError
    from bertexp.finetune import ner_split

    short = ["logger=none", "trainer.max_steps=2"]
    a = tmp_path / "a"
    run_in_process(a, [*short, "data.split_seed=1"])
    a_ckpt = a / "checkpoints" / "last"
    data_cfg = compose(["task=ner"]).data
    for name, split, refused in (("b", 2, True), ("c", 1, False)):
        run_in_process(tmp_path / name, [*short, "model=pretrained", f"model.path={a_ckpt}", f"data.split_seed={split}"])
        ckpt = tmp_path / name / "checkpoints" / "last"
        assert [e.get("split_seed") for e in json.loads((ckpt / "lineage.json").read_text())] == [split, 1]
        if refused:
            with pytest.raises(ConfigError, match=f"continues {a.resolve()}, which was pretrained on another split "
                                                  r"\(data.split_seed=1\)"):
                ner_split(data_cfg, ckpt)
        else:
            assert ner_split(data_cfg, ckpt)[1]["split_seed"] == 1
    outside = tmp_path / "outside"  # the same weights, without anything that says how they were pretrained
    shutil.copytree(a_ckpt, outside)
    for f in ("run_config.json", "lineage.json", "trainer_state.pt", "run_info.json"):
        (outside / f).unlink()
    run_in_process(tmp_path / "d", [*short, "model=pretrained", f"model.path={outside}", "data.split_seed=1"])
    with caplog.at_level(logging.WARNING, logger="bertexp.finetune"):
        ner_split(data_cfg, tmp_path / "d" / "checkpoints" / "last")
    assert f"continues {outside}, a model bertexp did not pretrain" in caplog.text
    # trainer.downstream=[ner] on a continuation with another split: refused before pretraining starts (last:
    # Hydra's logging set-up in run_main takes caplog's records away)
    import bertexp.train

    def never(*a, **k):
        raise AssertionError("pretraining started")

    with monkeypatch.context() as m:
        m.setattr(bertexp.train, "run_training", never)
        code = run_main(m, [*short, "model=pretrained", f"model.path={a_ckpt}", "data.split_seed=2",
                            "trainer.downstream=[ner]", f"hydra.run.dir={tmp_path / 'e'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"continues {a.resolve()}, which was pretrained on another split" in err, err[-1000:]
