"""Models named as users name them: `model.path` is a local directory or a Hugging Face Hub id (`bert-base-chinese`,
`org/name`, with `model.revision`). An id resolves through huggingface_hub to a snapshot directory in the HF cache
(`$HF_HOME/hub/models--ORG--NAME/snapshots/<commit>`); everything after that loads the directory with
`local_files_only=True` as before, so a run never touches the network after resolution.

Online, the snapshot is downloaded (only the files a BERT needs); offline (`HF_HUB_OFFLINE=1`, or a Hub that
cannot be reached within seconds) it comes from the cache. The commit of the snapshot is what provenance and
W&B record, so a run says exactly which weights it started from.

Nothing here imports torch or transformers: `check_inputs` resolves the id before those seconds of imports, and
each failure is one line that says which case it is (no such directory; not cached while offline; no such repo
or revision; a repo without a BERT's files)."""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bertexp.errors import CheckpointError, ConfigError

# The files a BERT / ModernBERT directory is made of (not the TF / Flax / ONNX copies many repos also hold).
MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.txt", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"]
TORCH_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
REACH_TIMEOUT_S = 3.0  # how long a Hub that does not answer may hold a run before it counts as offline
_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


@dataclass(frozen=True)
class Resolved:
    """Where a model.path points: a local directory, or an id with the snapshot it resolved to."""

    dir: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        """How errors and logs name it: the id and its commit, or the directory."""
        return f"{self.repo_id}@{self.commit[:12]}" if self.repo_id else str(self.dir)

    def record(self) -> dict:
        """For provenance.json and the W&B config."""
        if self.repo_id:
            return {"hub_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit,
                    "snapshot": str(self.dir)}
        return {"path": str(self.dir)}


def hf_home() -> str:
    from huggingface_hub import constants

    return constants.HF_HOME


def _looks_like_path(text: str) -> bool:
    """What can only be meant as a directory: `./x`, `/x`, `~/x`, `a/b/c`, `x/`; anything else may be an id."""
    return (text.startswith((".", "/", "~")) or text.endswith("/") or text.count("/") > 1 or os.sep != "/" and os.sep in text)


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def describe(path) -> dict:
    """What provenance records of a model directory: the id and commit if it is a snapshot in the HF cache."""
    m = _SNAPSHOT.search(Path(path).as_posix())
    if not m:
        return {"path": str(path)}
    return {"hub_id": m["repo"].replace("--", "/"), "commit": m["commit"], "snapshot": str(path)}


def resolve(path, revision: str | None = None, field: str = "model.path") -> Resolved:
    """model.path (and model.revision) to a local directory; raises CheckpointError / ConfigError in one line."""
    from bertexp.data.sources import user_path

    text = str(path)
    local = user_path(text)
    if local.is_dir():
        if revision:
            raise ConfigError(f"model.revision={revision} applies to a Hugging Face Hub id, but {field}={text} is a "
                              "local directory (drop model.revision)")
        return Resolved(local)
    if _looks_like_path(text) or not _is_repo_id(text):
        raise CheckpointError(f"{field}: directory not found: {local}")
    return _resolve_id(text, revision or None, str(local), field)


@functools.lru_cache(maxsize=16)
def _resolve_id(repo_id: str, revision: str | None, local: str, field: str) -> Resolved:
    # Cached per process: check_inputs, the model, the tokenizer and provenance all ask, and the first answer
    # (a download or a cache lookup) is the one the whole run uses.
    from huggingface_hub import constants

    cached = _from_cache(repo_id, revision)
    if cached is not None and (constants.HF_HUB_OFFLINE or _is_commit(revision)):
        return _checked(cached, repo_id, revision, field, cached=True)
    where = f"no directory {local}, and {repo_id!r} is"
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{field}={repo_id}: {where} not in the Hugging Face cache at HF_HOME={hf_home()} "
                              f"(HF_HUB_OFFLINE=1{_at(revision)}); connect, or run once online, or give a directory")
    unreachable = _unreachable()
    if unreachable:
        if cached is not None:
            import logging

            logging.getLogger(__name__).warning("The Hugging Face Hub cannot be reached (%s): %s comes from the cache "
                                                "(snapshot %s)", unreachable, repo_id, cached.name)
            return _checked(cached, repo_id, revision, field, cached=True)
        raise CheckpointError(f"{field}={repo_id}: {where} not in the Hugging Face cache at HF_HOME={hf_home()}, and "
                              f"the Hub ({constants.ENDPOINT}) cannot be reached ({unreachable}); connect, or give a "
                              "directory")
    return _checked(_download(repo_id, revision, where, field), repo_id, revision, field)


def _at(revision) -> str:
    return f", revision {revision}" if revision else ""


def _is_commit(revision) -> bool:
    return bool(revision) and re.fullmatch(r"[0-9a-f]{40}", str(revision)) is not None


def _from_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES + TORCH_BIN,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


def _unreachable() -> str | None:
    """Why the Hub cannot be reached within REACH_TIMEOUT_S, or None. huggingface_hub's own client waits without a
    timeout on a connection that is dropped rather than refused; this bounds that wait (bertexp.net)."""
    from huggingface_hub import constants

    from bertexp.net import connect_error

    return connect_error(constants.ENDPOINT, REACH_TIMEOUT_S)


def _download(repo_id: str, revision: str | None, where: str, field: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES, etag_timeout=REACH_TIMEOUT_S))
        if not any((snap / w).is_file() for w in ("model.safetensors", "model.safetensors.index.json")):
            snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=TORCH_BIN, etag_timeout=REACH_TIMEOUT_S))
        return snap
    except GatedRepoError:
        raise CheckpointError(f"{field}={repo_id}: the repo is gated: accept its terms on the Hub and log in "
                              "(`hf auth login`), or give a directory") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"model.revision={revision}: no such revision of {repo_id} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{field}={repo_id}: {where} no model on the Hugging Face Hub (or a private one: log "
                              "in with `hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{field}={repo_id}: cannot download it from the Hugging Face Hub ({first})") from None


def _checked(snapshot: Path, repo_id: str, revision: str | None, field: str, cached: bool = False) -> Resolved:
    """A snapshot holds whatever its repo holds: say in one line when that is not a model bertexp can load. One
    read from the cache alone (offline) may hold only part of its repo (a tokenizer fetched on its own)."""
    commit = snapshot.name
    name = f"{field}={repo_id} (commit {commit[:12]})"
    if cached:
        name += f", as the Hugging Face cache at HF_HOME={hf_home()} holds it,"
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"{name} has no config.json: not a transformers model repo")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((snapshot / w).is_file() for w in weights):
        raise CheckpointError(f"{name} has no PyTorch weights (expected model.safetensors or pytorch_model.bin)")
    if not ((snapshot / "vocab.txt").is_file() or (snapshot / "tokenizer.json").is_file()):
        raise CheckpointError(f"{name} has no vocab.txt or tokenizer.json (bertexp trains with the model's own tokenizer)")
    return Resolved(snapshot, repo_id, revision, commit)


def model_source(model_cfg) -> dict | None:
    """The provenance record of the model a run started from (model=pretrained, task=...), None for scratch."""
    path = model_cfg.get("path") if model_cfg is not None else None
    if not path:
        return None
    return resolve(path, model_cfg.get("revision")).record()


# Parameter prefixes of the pretraining heads, by the head's name in a user's terms.
_HEADS = (("the MLM head", ("cls.predictions.", "head.", "decoder.")),
          ("the NSP head", ("cls.seq_relationship.", "bert.pooler.")))


def new_heads(missing_keys) -> dict[str, list[str]]:
    """The heads whose weights the checkpoint lacked (transformers initialised them at random), with the modules
    each is missing; parameters outside any head are listed under their own module."""
    out: dict[str, set[str]] = {}
    for key in sorted(missing_keys):
        found = [(name, p) for name, prefixes in _HEADS for p in prefixes if key.startswith(p)]
        head, module = (found[0][0], found[0][1].rstrip(".")) if found else ("other weights", key.rsplit(".", 1)[0])
        out.setdefault(head, set()).add(module)
    return {k: sorted(v) for k, v in out.items()}


def report_new_heads(label: str, missing_keys) -> dict[str, list[str]]:
    """One line when a model starts part of itself from random weights: a directory saved as an encoder alone
    (the tutorial's `BertModel`) has no MLM or NSP head, and continued pretraining then begins by training
    those heads, so its first losses and exam scores are not the pretrained model's."""
    import logging

    heads = new_heads(missing_keys)
    if heads:
        parts = [f"{head} ({', '.join(modules)})" for head, modules in heads.items()]
        logging.getLogger("bertexp").warning(
            "model.path: %s has no weights for %s: they start from random weights (a model saved without its "
            "pretraining heads, e.g. as BertModel); its first steps train them, so early losses and exam scores are "
            "not the pretrained model's", label, " and ".join(parts))
    return heads
