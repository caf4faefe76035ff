"""On-disk cache: one folder per key, written under a temporary name and renamed into place, so a run
killed mid-write never leaves a half-written entry that a later run would trust."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(_UMASK)
_IN_PROGRESS: set[str] = set()  # this process's temporary entries being written (its pid alone is not enough)


def cache_root(cache_dir: str | None) -> Path:
    root = Path(os.path.expanduser(cache_dir or os.environ.get("BERTEXP_CACHE", "~/.cache/bertexp")))
    root.mkdir(parents=True, exist_ok=True)
    return root


def key_of(**parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_dir(root: Path, name: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (folder, was_cached); `build(tmp)` fills a fresh temporary folder on a miss."""
    final = root / name
    if final.is_dir():
        return final, True
    _remove_orphans(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{_HOST}.{os.getpid()}.", dir=root))
    _IN_PROGRESS.add(tmp.name)
    try:
        build(tmp)
        _as_created(tmp, folder=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _IN_PROGRESS.discard(tmp.name)
    return final, False


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write one cache file through a temporary file named with this host and process, renamed into place: a
    run killed mid-write leaves the old file or the new one, never half of one (the data reaches the disk
    before the rename, so a crash of the machine does not leave an empty file under the final name either),
    and two writers (threads, ranks, hosts sharing the cache) never share a temporary file; one left by a
    killed writer of this host is removed. Raises OSError, with the temporary file removed."""
    _remove_orphans(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    _IN_PROGRESS.add(tmp.name)
    try:
        with open(fd, "wb") as f:
            _as_created(fd)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _IN_PROGRESS.discard(tmp.name)


def _as_created(path: Path | int, folder: bool = False) -> None:
    """The permissions open() or mkdir() would have given: mkstemp and mkdtemp make entries private, and a cache
    shared by several users (BERTEXP_CACHE) must not hold hits that only their builder can read."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_UMASK)


def _remove_orphans(root: Path, name: str) -> None:
    """Temporary folders (or files) of this entry left by a process that was killed (SIGKILL): their names
    hold the builder's host and pid; one of this host whose builder is gone is removed. One still being built,
    or one of another host sharing the cache (NFS), whose processes cannot be seen from here, is not."""
    for tmp in root.glob(f".{name}.{_HOST}.*"):
        parts = tmp.name[len(name) + len(_HOST) + 3 :].split(".")
        if not parts or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        try:
            os.kill(pid, 0)
            # this process's own pid: an entry it is writing now (another thread), or the leftover of an earlier
            # process that had the same pid (a container restarted)
            alive = pid != os.getpid() or tmp.name in _IN_PROGRESS
        except ProcessLookupError:
            alive = False
        except PermissionError:  # someone else's live process
            alive = True
        if not alive:  # best effort: another user's orphan in a shared cache may not be ours to remove
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    tmp.unlink()
                except OSError:
                    pass
