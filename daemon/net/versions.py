"""Model versions through the network's object store bucket (DESIGN §9, docs/network.md): the centre puts each
accepted version as ``v<N>`` and keeps the newest ``keep_versions``; a station polls the bucket and downloads a
newer version than it serves. A version that fails a check (its size in the listing or as fetched, the
object's digest, its unpacking) is refused once: counted in ``wingbeat_network_versions_refused_total{reason}``,
logged, and never fetched again. Coroutines of ``daemon.net.link.NetworkLink``'s thread, kept in their own module."""

from __future__ import annotations

import asyncio
import queue
import tarfile
from pathlib import Path
from typing import Any

from daemon.net.wire import MAX_VERSION_BYTES, VERSION_NAME, pack_version, stale_versions, unpack_version
from daemon.ops.config import Network as NetworkConfig
from daemon.ops.metrics import Metrics

REFUSALS = ("size", "digest", "unpack")  # why a station refuses a version from the bucket


class BucketVersions:
    """Mixed into ``NetworkLink``: its configuration, queues, log and retry loop are the link's."""

    cfg: NetworkConfig
    state: Path
    serving: int
    refused_versions: set[int]
    versions: queue.Queue[tuple[int, Path]]
    to_put: queue.Queue[tuple[int, Path]]
    log: Any
    metrics: Metrics

    async def _retrying(self, what: str, step: Any) -> None:
        raise NotImplementedError  # NetworkLink's

    async def _bucket(self, js: Any) -> Any:
        from nats.js.api import ObjectStoreConfig

        try:
            return await js.object_store(self.cfg.bucket)
        except Exception:
            return await js.create_object_store(
                self.cfg.bucket, ObjectStoreConfig(bucket=self.cfg.bucket, replicas=self.cfg.replicas)
            )

    async def _watch_versions(self, js: Any) -> None:
        """Poll the bucket every 2 s (a poll survives server restarts that a watcher would have to notice) and
        download the newest version when it is newer than the serving one."""
        incoming = self.state / "incoming"
        obs = None

        async def step() -> bool:
            nonlocal obs
            await asyncio.sleep(2.0)
            if obs is None:
                obs = await self._bucket(js)
            try:
                infos = await obs.list()
            except Exception as e:
                if "no objects" in str(e).lower() or type(e).__name__ == "NotFoundError":
                    return True
                raise
            sizes = {int(m.group(1)): i.size for i in infos if not i.deleted and (m := VERSION_NAME.fullmatch(i.name))}
            newest = max(sizes, default=0)
            if newest <= self.serving or newest in self.refused_versions:
                return True
            size = sizes[newest] or 0
            if size > MAX_VERSION_BYTES:  # from the listing: never downloaded
                return self._refuse(newest, "size", f"{size} bytes in the listing (max {MAX_VERSION_BYTES})")
            from nats.js.errors import DigestMismatchError

            try:
                res = await obs.get(f"v{newest}")  # the client checks the object's SHA-256 digest
            except DigestMismatchError:
                return self._refuse(newest, "digest", "the object's SHA-256 digest does not match its chunks")
            if len(res.data) > MAX_VERSION_BYTES:
                return self._refuse(newest, "size", f"{len(res.data)} bytes fetched (max {MAX_VERSION_BYTES})")
            try:
                path = unpack_version(res.data, incoming / f"v{newest}")
            except (tarfile.TarError, ValueError, EOFError) as e:  # not OSError: a full disk is no fault of the version
                return self._refuse(newest, "unpack", str(e)[:200])
            self.refused_versions.add(newest)  # offered once; ``served`` moves ``serving`` past it
            self.versions.put((newest, path))
            self.log.info("network_version", model_version=newest, bytes=len(res.data))
            return True

        await self._retrying("versions", step)

    def _refuse(self, n: int, reason: str, detail: str) -> bool:
        """Refuse version ``n`` for good: counted and logged once, never fetched again."""
        self.refused_versions.add(n)
        self.metrics.net_versions_refused.labels(reason).inc()
        self.log.error("network_version_refused", model_version=n, reason=reason, detail=detail)
        return True

    async def _put_versions(self, js: Any) -> None:
        from nats.js.api import ObjectMeta

        obs = None
        pending: dict[int, Path] = {}
        prune = False  # versions were put: older ones are deleted (tried again until it succeeds)

        async def step() -> bool:
            nonlocal obs, prune
            while True:
                try:
                    n, path = self.to_put.get_nowait()
                    pending[n] = path
                except queue.Empty:
                    break
            if not pending and not prune:
                return False
            if obs is None:
                obs = await self._bucket(js)
            for n in sorted(pending):
                data = pack_version(pending[n])
                await obs.put(f"v{n}", data, meta=ObjectMeta(name=f"v{n}", description="wingbeat model version"))
                self.log.info("network_version_put", model_version=n, bytes=len(data))
                del pending[n]
                prune = True
            live = [i.name for i in await obs.list() if not i.deleted]  # holds what was just put
            for name in stale_versions(live, self.cfg.keep_versions):  # the bucket does not grow for ever
                await obs.delete(name)
                self.log.info("network_version_deleted", name=name, keep=self.cfg.keep_versions)
            prune = False
            return True

        await self._retrying("put_versions", step)
