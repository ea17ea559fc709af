"""Model-version directories on disk: written to a temporary name and renamed into place; read and checked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from daemon.faults import crash_point
from model.checkpoint import FILES, CheckpointError, ModelVersion, unpack


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(path: Path | str, files: dict[str, bytes], replace: bool = False) -> Path:
    """Write ``files`` into directory ``path`` atomically: all of them appear at once, or none.

    An existing ``path`` is an error unless ``replace``; then it is swapped out after the new one is complete.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists (choose another --out, or --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for k, (name, data) in enumerate(files.items()):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if k == 0:
                crash_point("trainer_write")  # one file of the version written, the rest not
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_version(path: Path | str) -> ModelVersion:
    """Load and check the model version in directory ``path``; CheckpointError names what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    files = {}
    for name in FILES:
        try:
            files[name] = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not a model version (missing {name})") from None
        except OSError as e:
            raise CheckpointError(f"{path}/{name}: cannot read ({e.strerror})") from None
    try:
        return unpack(files)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
