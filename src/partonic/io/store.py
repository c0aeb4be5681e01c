"""Dataset cache in HDF5, keyed by a hash of the card's data section and seed.

A cache file is written to a temporary name in the cache folder, marked complete
as its last act, flushed and renamed into place: a reader sees a complete file or
none. Files that are unreadable, unfinished or of another format version are
treated as absent (and removed), never as valid data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

__all__ = ["DatasetCache", "cache_key", "default_cache_dir", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$PARTONIC_CACHE`` if set, else ``~/.cache/partonic/datasets``."""
    env = os.environ.get("PARTONIC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "partonic" / "datasets"


def cache_key(kind: str, data_section: Any, seed: int, **extra: Any) -> str:
    """Stable key from the dataset kind, the card's data section (a pydantic model or
    plain data), the seed and anything else that changes the data (e.g. √s)."""
    if hasattr(data_section, "model_dump"):
        data_section = data_section.model_dump(mode="json")
    text = json.dumps({"kind": kind, "data": data_section, "seed": seed, "extra": extra, "v": FORMAT_VERSION}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the process's umask, read once (reading it sets it, which would race with other threads)
_UMASK = _read_umask()


@contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write: renamed onto ``path``
    (after an fsync) when the block ends, removed when it raises, so that a reader never
    sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); the result follows the umask, as any
        # file the user writes, so that a group can read a run folder or a shared cache
        # (a file system that refuses chmod keeps the private file)
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
        except OSError:
            pass
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DatasetCache:
    """Arrays stored under a key, atomically.

    Example:
        >>> cache = DatasetCache(tmp_dir)
        >>> key = cache_key("zw", {"n_events": 10}, seed=1)
        >>> cache.save(key, {"x": np.zeros(3)}, meta={"events": 3})
        >>> arrays, meta = cache.load(key)
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.h5"

    def exists(self, key: str) -> bool:
        return self.load(key) is not None

    def save(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> Path:
        target = self.path(key)
        with atomic_target(target, suffix=".h5.tmp") as tmp:
            with h5py.File(tmp, "w") as fh:
                fh.attrs["partonic_format"] = FORMAT_VERSION
                fh.attrs["key"] = key
                fh.attrs["meta"] = json.dumps(dict(meta or {}), default=str)
                for name, value in arrays.items():
                    value = np.asarray(value)
                    fh.create_dataset(name, data=value, compression="lzf" if value.size > 1024 else None)
                # Written last: a file without it was never finished.
                fh.attrs["complete"] = True
                fh.flush()
        return target

    def load(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        target = self.path(key)
        if not target.is_file():
            return None
        try:
            with h5py.File(target, "r") as fh:
                if not fh.attrs.get("complete", False) or fh.attrs.get("partonic_format") != FORMAT_VERSION or fh.attrs.get("key") != key:
                    raise ValueError("incomplete or foreign cache file")
                arrays = {name: fh[name][()] for name in fh.keys()}
                meta = json.loads(fh.attrs.get("meta", "{}"))
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"ignoring unusable dataset cache file {target} ({exc}); it will be rebuilt", RuntimeWarning, stacklevel=2)
            target.unlink(missing_ok=True)
            return None
        return arrays, meta
