"""data=hf_dataset: a `datasets` dataset as the corpus (save_to_disk folder, a builder over files, a stream), fed
through the same tokenise-once cache as data=text_file, keyed by the dataset's fingerprint."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ESSAY, compose, run_here

SMALL = ["data.max_length=32", "data.batch_size=8", "model.vocab_size=500", "trainer=smoke", "logger=none"]


def _documents() -> list[str]:
    return [p.strip() for p in ESSAY.read_text(encoding="utf-8").split("\n\n") if p.strip()]


@pytest.fixture
def essay_sets(tmp_path):
    """The essay as JSON lines (one paragraph a record, field `content`) and as a save_to_disk folder."""
    from datasets import Dataset

    jsonl = tmp_path / "essay.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d}, ensure_ascii=False) + "\n" for d in _documents()), encoding="utf-8")
    Dataset.from_dict({"text": _documents()}).save_to_disk(str(tmp_path / "essay_ds"))
    return jsonl, tmp_path / "essay_ds"


def _prepared(overrides: list[str], cache: Path):
    from hydra.utils import instantiate
    from transformers import BertTokenizerFast

    from hub_cache import _tokenizer

    cfg = compose([*overrides, f"data.cache_dir={cache}", "data.num_proc=1"])
    data = instantiate(cfg.data)
    tok_dir = cache / "tok"
    if not (tok_dir / "vocab.txt").is_file():
        _tokenizer(tok_dir)
    data.prepare(BertTokenizerFast.from_pretrained(str(tok_dir)), seed=0)
    return data


def test_a_save_to_disk_folder_and_a_json_builder_train(essay_sets, tmp_path, monkeypatch, capfd):
    jsonl, folder = essay_sets
    for i, args in enumerate((["data=hf_dataset", f"data.name={folder}"],
                              ["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}", "data.text_field=content"])):
        run = tmp_path / f"run{i}"
        r = run_here(monkeypatch, capfd, [*args, *SMALL, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"])
        assert r.returncode == 0, r.stderr[-2000:]
        assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    # the dataset is what the run trained on: changed, a resume is refused like a changed text file
    jsonl.write_text(jsonl.read_text(encoding="utf-8") + json.dumps({"content": "后来加的一段。"}, ensure_ascii=False)
                     + "\n", encoding="utf-8")
    r = run_here(monkeypatch, capfd, [*args, *SMALL, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}",
                                      "trainer.max_steps=6", "trainer.allow_changes=[trainer.max_steps]"])
    assert r.returncode == 2 and "data.corpus_fingerprint" in r.stderr, r.stderr[-2000:]


def test_a_dataset_gives_the_tokens_its_files_give(essay_sets, tmp_path):
    """One record is one document: the essay read as a dataset (arrow folder, json builder, and as a stream)
    tokenises to exactly the arrays data=text_file makes of the same JSON lines, with the same held-out split."""
    jsonl, folder = essay_sets
    reference = _prepared(["data=text_file", f"data.path={jsonl}", "data.text_field=content"], tmp_path / "c")
    for args in (["data=hf_dataset", f"data.name={folder}"],
                 ["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}", "data.text_field=content"],
                 ["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}", "data.text_field=content",
                  "data.streaming=true"],
                 ["data=hf_dataset", f"data.name={folder}", "data.streaming=true"]):
        data = _prepared(args, tmp_path / "c")
        assert data.tokens_dir != reference.tokens_dir  # its own cache entry...
        np.testing.assert_array_equal(np.asarray(data.tokens.ids), np.asarray(reference.tokens.ids))  # ...same tokens
        np.testing.assert_array_equal(np.asarray(data.tokens.doc_offsets), np.asarray(reference.tokens.doc_offsets))
        np.testing.assert_array_equal(data.heldout_examples(32, 0.0)[0], reference.heldout_examples(32, 0.0)[0])


def test_a_changed_dataset_is_tokenised_again(essay_sets, tmp_path):
    from datasets import Dataset

    jsonl, folder = essay_sets
    cache = tmp_path / "c"
    for args, change in (
        (["data=hf_dataset", f"data.name={folder}"],
         lambda: Dataset.from_dict({"text": [*_documents(), "新的一段。它也有两句。"]}).save_to_disk(str(folder))),
        (["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}", "data.text_field=content"],
         lambda: jsonl.write_text(jsonl.read_text(encoding="utf-8") + json.dumps({"content": "新的一段。它也有两句。"},
                                                                                  ensure_ascii=False) + "\n", encoding="utf-8")),
        (["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}", "data.text_field=content", "data.streaming=true"],
         lambda: jsonl.write_text(jsonl.read_text(encoding="utf-8") + json.dumps({"content": "再一段。还是两句。"},
                                                                                  ensure_ascii=False) + "\n", encoding="utf-8")),
    ):
        before = _prepared(args, cache)
        again = _prepared(args, cache)
        assert again.tokens_dir == before.tokens_dir  # unchanged: read from the cache
        change()
        after = _prepared(args, cache)
        assert after.tokens_dir != before.tokens_dir
        assert len(after.tokens.ids) > len(before.tokens.ids)
    # a stream's file rewritten in place with its size and time kept (cp -p, rsync -a): its bytes key the cache
    import os

    args = ["data=hf_dataset", "data.name=json", f"data.data_files={jsonl}", "data.text_field=content", "data.streaming=true"]
    before, st = _prepared(args, cache), jsonl.stat()
    jsonl.write_text(jsonl.read_text(encoding="utf-8").replace("再一段", "又一段"), encoding="utf-8")
    os.utime(jsonl, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert jsonl.stat().st_size == st.st_size
    assert _prepared(args, cache).tokens_dir != before.tokens_dir


def test_bad_datasets_are_one_line_errors(essay_sets, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    from bertexp.errors import BertexpError

    jsonl, folder = essay_sets
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("不是数据集。\n", encoding="utf-8")

    def error(*overrides) -> str:
        from bertexp.job import _user_error  # what a run shows: the user's error inside Hydra's wrapper

        with pytest.raises(Exception) as e:
            data = instantiate(compose(["data=hf_dataset", *overrides]).data)
            data.source.fingerprint()
        user = _user_error(e.value)
        assert isinstance(user, BertexpError) and "\n" not in str(user), e.value
        return str(user)

    assert error().startswith("data.name is not set")
    assert "not one written by save_to_disk" in error(f"data.name={tmp_path / 'plain'}")
    assert error("data.name=json").startswith("data.data_files is not set")
    assert error("data.name=json", f"data.data_files={jsonl}") == \
        "data.text_field: json split train has no column 'text' (columns: content)"
    assert error(f"data.name={folder}", "data.text_field=body").endswith("has no column 'body' (columns: text)")
    assert "data=hf_dataset reads data.name" in error(f"data.name={folder}", f"data.path={jsonl}")
    assert error(f"data.name={folder}", "data.split=test").startswith("data.split=test: ")  # not all of it instead

    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "dscache")
    msg = error("data.name=tiny-org/absent")
    assert msg.startswith("data.name=tiny-org/absent: no such directory, and not in the datasets cache at ")
    assert "(offline); connect, or run once online, or give a save_to_disk directory" in msg


def test_a_hub_dataset_in_the_datasets_cache_loads_by_its_name_offline(essay_sets, tmp_path, monkeypatch):
    """Offline, `data.name=ORG/NAME` is read from the datasets cache (as left by an earlier online load), and
    tokenises to what the same records give as files."""
    import datasets
    from huggingface_hub import constants

    from hub_cache import put_dataset_in_cache

    jsonl, _ = essay_sets
    put_dataset_in_cache(tmp_path / "dscache", "tiny-org/essays", jsonl)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "dscache")
    reference = _prepared(["data=text_file", f"data.path={jsonl}", "data.text_field=content"], tmp_path / "c")
    data = _prepared(["data=hf_dataset", "data.name=tiny-org/essays", "data.text_field=content"], tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(data.tokens.ids), np.asarray(reference.tokens.ids))
