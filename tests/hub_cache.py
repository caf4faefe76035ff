"""Tiny models in the real Hugging Face cache layout, for tests that cannot download: a BERT and a ModernBERT
with a tokenizer of the essay's characters, written under `HF_HOME/hub/models--ORG--NAME/` (`blobs/`,
`snapshots/<commit>/` of links into them, `refs/main`) with the functions huggingface_hub's own downloads use
to write that layout, so transformers and `snapshot_download(..., local_files_only=True)` find it as if it had
been downloaded."""
from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import ESSAY

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(out: Path):
    from transformers import BertTokenizerFast

    chars = sorted({c for c in ESSAY.read_text(encoding="utf-8") if not c.isspace()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(SPECIALS + chars) + "\n", encoding="utf-8")
    tok = BertTokenizerFast.from_pretrained(str(out))  # from vocab.txt, as bertexp's own vocabularies load
    tok.save_pretrained(str(out))
    return tok


def tiny_bert(out: Path, encoder_only: bool = False) -> Path:
    """A BERT of 1 layer, 32 wide, with MLM and NSP heads (BertForPreTraining), or without them (BertModel, as the
    tutorial loads it)."""
    import torch
    from transformers import BertConfig, BertForPreTraining, BertModel

    tok = _tokenizer(out)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    (BertModel(cfg) if encoder_only else BertForPreTraining(cfg)).save_pretrained(str(out))
    return out


def tiny_modernbert(out: Path) -> Path:
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    tok = _tokenizer(out)
    cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                           cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    ModernBertForMaskedLM(cfg).save_pretrained(str(out))
    return out


def put_in_cache(hf_home: Path, repo_id: str, model_dir: Path, revision: str = "main") -> Path:
    """Copy `model_dir` into the hub cache under `hf_home` as repo `repo_id` at a commit derived from its files;
    returns the snapshot directory."""
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, repo_folder_name

    storage = Path(hf_home) / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = storage / "snapshots" / commit
    for f in files:
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snapshot.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(snapshot / f.name), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return snapshot


def use_cache(monkeypatch, hf_home: Path) -> None:
    """This process reads the hub cache under `hf_home`, offline (as `HF_HOME=... HF_HUB_OFFLINE=1` would make a
    new process do: huggingface_hub reads those variables once, when imported)."""
    from huggingface_hub import constants

    import bertexp.hub

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bertexp.hub._resolve_id.cache_clear()


def put_dataset_in_cache(datasets_cache: Path, repo_id: str, jsonl: Path, commit: str = "0" * 40) -> Path:
    """A Hub dataset `repo_id` as `datasets` leaves it in its cache after `load_dataset(repo_id)` online (what it
    reads offline by the name): prepared by datasets' own json builder, then filed under the repo's name
    (`NAMESPACE___NAME/default/0.0.0/COMMIT/`, `NAME-train.arrow`, its dataset_info naming it)."""
    import json
    import shutil

    import datasets

    name = repo_id.split("/")[-1]
    builder = datasets.load_dataset_builder("json", data_files=str(Path(jsonl).resolve()),
                                            cache_dir=str(Path(datasets_cache).parent / "json_builder"))
    builder.download_and_prepare()
    dst = Path(datasets_cache) / repo_id.replace("/", "___") / "default" / "0.0.0" / commit
    dst.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        shutil.copy(f, dst / f.name.replace("json-", f"{name}-"))
    info = json.loads((dst / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": name}))
    return dst
