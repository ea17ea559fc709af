"""Model-version directories on disk: written to a temporary name and renamed into place; read and checked;
numbered and owned by ``ModelDir``."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.ops import logs
from daemon.ops.faults import crash_point
from daemon.ops.metrics import Metrics
from daemon.store.db import Store
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


VERSION_DIR = re.compile(r"v(\d+)")


class Refused(ValueError):
    """A readable version that may not serve this store; ``n`` is the number it was recorded (rejected) under."""

    def __init__(self, n: int, why: str) -> None:
        super().__init__(why)
        self.n = n


class ModelDir:
    """The one owner of ``models/v<N>``: numbers are claimed in the store (never reused, never handed out twice),
    versions are imported, read, and discarded here."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store
        root.mkdir(parents=True, exist_ok=True)

    def path(self, n: int) -> Path:
        return self.root / f"v{n}"

    def remove_partial(self) -> list[Path]:
        """Half-written directories of a process killed before its rename."""
        left = sorted(self.root.glob(".v*"))
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        return left

    def claim(self, kind: str, at_least: int = 0) -> int:
        """A fresh version number (``at_least`` or above), recorded as ``training`` in the store in one
        transaction."""
        on_disk = [int(m.group(1)) for p in self.root.iterdir() if (m := VERSION_DIR.fullmatch(p.name))]
        return self.store.claim_version(max(at_least, max([0, *on_disk]) + 1), kind)

    def import_(self, source: Path | str, at_least: int = 0) -> tuple[ModelVersion, int]:
        """Check ``source`` and copy it in as a newly claimed version (numbered ``at_least`` where that is free:
        a station keeps the centre's number)."""
        version = read_version(source)  # a bad directory is said in one line before anything is copied
        n = self.claim("imported", at_least)
        tmp = self.root / f".v{n}.import"
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        os.replace(tmp, self.path(n))
        return version, n

    def adopt(
        self, source: Path | str, kind: str, unservable: Callable[[ModelVersion], str], at_least: int = 0
    ) -> tuple[ModelVersion, int]:
        """Import a version made elsewhere (``--model``, the network) and check that it may serve this store; a
        refused one is discarded and recorded as rejected (its number stays used). Raises CheckpointError for a
        version that cannot be read, Refused for one that may not serve."""
        version, n = self.import_(source, at_least)
        if why := unservable(version):
            self.discard(n)
            self.store.record_model(n, "rejected", kind, {}, why)
            raise Refused(n, why)
        return version, n

    def at_start(
        self, model: str, unservable: Callable[[ModelVersion], str], metrics: Metrics
    ) -> tuple[ModelVersion, int, str, dict[str, Any]] | None:
        """The version to serve at start-up, with how it came (for the swap): ``model`` (a directory, imported as the
        next version) when given, else the newest that served here, loads, and may serve this store. First clears
        what a killed daemon left: half-written directories, and claims of trainings that died with it. A bad
        ``model`` raises as ``adopt`` does; versions that no longer load are counted and skipped."""
        log = logs.get()
        for left in self.remove_partial():
            log.warning("removed_partial_model", path=str(left))
        for n in self.store.abandon_claims("the daemon stopped during this training"):
            log.warning("training_abandoned", model_version=n)
        if model:
            version, n = self.adopt(model, "imported", unservable)
            return version, n, "imported", {"source": str(model)}
        served = [m["version"] for m in self.store.models() if m["status"] in ("serving", "retired")]
        for n in sorted(served, reverse=True):
            try:
                version = self.load(n)
            except CheckpointError as e:
                metrics.models_rejected.labels("unreadable").inc()
                log.error("model_unreadable", model_version=n, error=str(e))
                continue
            if not unservable(version):
                return version, n, "restored", {}
        return None

    def from_network(
        self, n: int, path: Path, unservable: Callable[[ModelVersion], str], metrics: Metrics
    ) -> tuple[ModelVersion, int] | None:
        """``adopt`` version ``n`` downloaded to ``path`` (removed afterwards) under the centre's number; None, counted
        and logged, for one that cannot be read or may not serve here."""
        try:
            return self.adopt(path, "network", unservable, at_least=n)
        except (CheckpointError, Refused) as e:
            unreadable = isinstance(e, CheckpointError)
            metrics.models_rejected.labels("unreadable" if unreadable else "gate").inc()
            logs.get().error("model_refused", model_version=n, source="network", error=str(e), unreadable=unreadable)
            return None
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, n: int) -> ModelVersion:
        return read_version(self.path(n))

    def discard(self, n: int) -> None:
        """Remove what a training for version ``n`` left: the version, or its half-written temporary directory."""
        for p in [self.path(n), *self.root.glob(f".v{n}.*")]:
            shutil.rmtree(p, ignore_errors=True)
