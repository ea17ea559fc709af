"""The network stage (DESIGN §9, docs/network.md): a station's outbox to NATS JetStream, its model versions from
the network, its outputs on NATS; at the centre, the durable consumer that pools the stations' events and the
object store bucket the accepted versions go to.

nats-py is asyncio: ``NetworkLink`` runs it in one thread with its own event loop. The serving loop talks to it
only through thread-safe queues and two integers, never waits on the network, and stays the store's one writer:

- station: the thread reads the outbox (this daemon's events above the forwarded watermark) on its own read-only
  SQLite connection (WAL lets it read beside the writer), publishes them oldest first, and advances ``acked`` on
  JetStream's publish acks; the loop records ``acked`` in the store (``record``), at most every half second: a
  crash resends at most that much, which the centre's unique key ``(station, sensor, seq)`` drops.
- centre: the thread fetches from the durable pull consumer and decodes (malformed messages become quarantine
  rows); the loop stores a batch in one transaction (``pool``), then hands its messages back to be acked.
- versions: the centre puts each accepted version into the bucket as ``v<N>``; a station's thread polls the bucket
  and downloads a newer version into ``incoming/``; the loop imports it through ``ModelDir.import_`` (checked as a
  local one is) under the same number, and swaps it in between batches.

The messages and the packing of versions are pure, in ``daemon.net.wire``; the bucket's side of versions is
``daemon.net.versions``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from daemon.net.consume import Batch, PoolConsumer
from daemon.net.versions import BucketVersions
from daemon.net.wire import (
    EVENTS,
    encode_event,
    output_subject,
)
from daemon.ops import logs
from daemon.ops.config import Network as NetworkConfig
from daemon.ops.metrics import Metrics
from daemon.protocol import REFUSED, Output
from daemon.store.db import Store


class PlaintextRefused(ConnectionError):
    pass


def is_tls(nc: Any) -> bool:
    """Whether nats-py's connection runs over TLS (its transport's stream carries an SSL object)."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


# ---- the stage ---------------------------------------------------------------------------------------------------
class NetworkLink(BucketVersions, PoolConsumer):
    """One thread running nats-py. The serving loop calls ``record``, ``pool``, ``take_version``, ``served``,
    ``refused``, ``publish`` and ``offer_version``; none of them waits."""

    def __init__(self, cfg: NetworkConfig, state: Path, store: Store, metrics: Metrics) -> None:
        self.cfg, self.state, self.metrics = cfg, state, metrics
        self.centre = cfg.role == "centre"
        self.trains = self.centre or cfg.train_locally
        self.log = logs.get()
        self.stopping = threading.Event()
        self.features: dict[str, Any] | None = None  # the store's feature config, set by ``start``
        # thread → loop
        self.acked = store.forwarded()  # outbox watermark acked by JetStream (int: set atomically)
        self.recorded, self.recorded_at = self.acked, 0.0
        self.pooled: queue.Queue[Batch] = queue.Queue(maxsize=4)
        self.versions: queue.Queue[tuple[int, Path]] = queue.Queue()
        # loop → thread
        self.outputs: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10_000)
        self.to_ack: queue.Queue[list[tuple[Any, bool]]] = queue.Queue()
        self.to_put: queue.Queue[tuple[int, Path]] = queue.Queue()
        self.serving = 0  # the version serving here (int: set atomically)
        self.refused_versions: set[int] = set()
        self.thread = threading.Thread(target=self._main, name="network", daemon=True)
        self.warn = logs.RateLimited(30.0)

    # ---- the loop's side ----------------------------------------------------------------------------------------
    def start(self, serving: int, features: dict[str, Any] | None) -> None:
        self.serving, self.features = serving, features
        self.thread.start()

    def commit(self, store: Store) -> int:
        """Once a turn: record the acked watermark and, at the centre, store the pooled events; how many were stored
        (0 when the store failed: nothing is acked, and JetStream redelivers). No error stops the loop: one
        event's is quarantined by the store (``ingest_pooled``), anything else is logged and redelivered."""
        try:
            self.record(store)
            return self.pool(store)
        except sqlite3.OperationalError as e:
            self.metrics.store_errors.labels("ingest").inc()
            self.log.error("store_failed", error=str(e), detail="network: not acked, JetStream redelivers")
            return 0
        except Exception as e:
            self.metrics.store_errors.labels("ingest").inc()
            self.log.error("store_failed", error=repr(e)[:300], detail="network: not acked, JetStream redelivers")
            return 0

    def record(self, store: Store, force: bool = False) -> None:
        """Record the acked watermark in the store (the loop is the one writer), at most every 0.5 s."""
        acked, now = self.acked, time.monotonic()
        if acked > self.recorded and (force or now - self.recorded_at >= 0.5):
            store.set_forwarded(acked)
            self.recorded, self.recorded_at = acked, now

    def pool(self, store: Store) -> int:
        """Centre: store the batches fetched so far, each in one transaction, then have them acked; returns
        events newly stored. A failed commit acks nothing: JetStream redelivers after ``ack_wait``."""
        stored = 0
        while True:
            try:
                batch = self.pooled.get_nowait()
            except queue.Empty:
                return stored
            ids = store.ingest_pooled(batch.events, batch.quarantine)
            refused = {batch.event_msg[k] for k, i in enumerate(ids) if i == REFUSED}
            self.to_ack.put([(m, poison or k in refused) for k, (m, poison) in enumerate(batch.msgs)])
            new = sum(i > 0 for i in ids)
            stored += new
            self.metrics.net_pooled.inc(new)
            if refused:
                batch.reasons["store"] += len(refused)
                self.log.warning("network_quarantined", reason="store", events=len(refused))
            for reason, n in batch.reasons.items():
                self.metrics.net_quarantined.labels(reason).inc(n)

    def take_version(self) -> tuple[int, Path] | None:
        """Station: a version downloaded from the bucket, newer than the one serving."""
        try:
            return self.versions.get_nowait()
        except queue.Empty:
            return None

    def served(self, n: int) -> None:
        self.serving = n

    def refused(self, n: int) -> None:
        self.refused_versions.add(n)

    def publish(self, outputs: list[Output]) -> None:
        """Station: outputs on ``wingbeat.out.<station>.<cluster>`` (core NATS, at most once, like the XPUB)."""
        if self.centre:
            return
        for o in outputs:
            try:
                self.outputs.put_nowait((output_subject(self.cfg.station, o), json.dumps(o.to_wire()).encode()))
            except queue.Full:
                self.metrics.net_outputs.labels("dropped").inc()

    def diversity(self, summary: dict[str, Any]) -> None:
        """Station: a closed window's diversity summary on ``wingbeat.diversity.<station>`` (core NATS, at most
        once, beside the outputs; counted with them in wingbeat_network_outputs_total)."""
        if self.centre:
            return
        try:
            self.outputs.put_nowait((f"wingbeat.diversity.{self.cfg.station}", json.dumps(summary).encode()))
        except queue.Full:
            self.metrics.net_outputs.labels("dropped").inc()

    def offer_version(self, n: int, path: Path) -> None:
        """Centre: put an accepted (or restored) version into the bucket."""
        if self.centre:
            self.to_put.put((n, path))

    def stop(self, store: Store) -> None:
        """Flip the flag, give the thread 10 s to send what is queued and close, record the watermark."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(10)
        self.record(store, force=True)

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as e:  # the link is gone until a restart: say so loudly, never take the loop down
            self.log.error("network_failed", error=repr(e))
            self.metrics.net_connected.set(0)

    def _options(self) -> dict[str, Any]:
        c = self.cfg
        opts: dict[str, Any] = {
            "servers": [u.strip() for u in c.nats.split(",")],
            "name": f"wingbeat-{c.station or 'centre'}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
            "connect_timeout": 2,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
        }
        if c.creds:
            opts["user_credentials"] = c.creds
        if c.nkey:
            opts["nkeys_seed"] = c.nkey
        if self.wants_tls():
            ctx = ssl.create_default_context(cafile=c.tls_ca or None)
            if c.tls_cert:
                ctx.load_cert_chain(c.tls_cert, c.tls_key)
            opts["tls"] = ctx
        return opts

    def wants_tls(self) -> bool:
        """``tls://``, a CA or a client certificate: TLS or no connection (nats-py alone would talk plain TCP to a
        server that does not ask for TLS)."""
        c = self.cfg
        return bool(c.tls_ca or c.tls_cert or any(u.strip().startswith("tls://") for u in c.nats.split(",")))

    async def _run(self) -> None:
        gauges = None if self.centre else asyncio.create_task(self._outbox_gauges())
        try:
            await self._connected()
        finally:
            if gauges is not None:
                await gauges

    async def _outbox_gauges(self) -> None:
        """Station: the outbox's depth and age every second, connected or not (a link that never came up is
        the case to see)."""
        db = Store(self.state, readonly=True)
        try:
            while not self.stopping.is_set():
                try:
                    n, oldest = db.outbox_depth(self.acked)
                    self.metrics.outbox_events.set(n)
                    self.metrics.outbox_age.set(max(0.0, time.time() - oldest / 1e9) if oldest else 0.0)
                except sqlite3.Error as e:
                    if due := self.warn.due(("outbox_gauges",), 1):
                        self.log.warning("network_retry", stage="outbox_gauges", error=str(e), times=due)
                await asyncio.sleep(1.0)
        finally:
            db.close()

    async def _connected(self) -> None:
        import nats

        async def changed(up: bool) -> None:
            self.metrics.net_connected.set(1 if up else 0)
            self.log.info("network_connected" if up else "network_disconnected", nats=self.cfg.nats)

        async def disconnected() -> None:
            await changed(False)

        async def reconnected() -> None:
            if self.wants_tls() and nc is not None and not is_tls(nc):
                self.log.error("network_refused_plaintext", nats=self.cfg.nats, detail="reconnected without TLS")
                await nc.close()  # the link stays down: TLS or no connection
                return
            await changed(True)

        async def on_error(e: Exception) -> None:
            if due := self.warn.due(("nats", type(e).__name__), 1):
                self.log.warning("network_error", error=repr(e), times=due)

        nc = None
        while nc is None and not self.stopping.is_set():
            try:
                nc = await nats.connect(
                    **self._options(),
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=on_error,
                )
                if self.wants_tls() and not is_tls(nc):
                    await nc.close()
                    nc = None
                    raise PlaintextRefused(f"{self.cfg.nats}: the server did not take TLS; not connecting in plain")
            except Exception as e:
                if due := self.warn.due(("connect",), 1):
                    event = "network_refused_plaintext" if isinstance(e, PlaintextRefused) else "network_unreachable"
                    self.log.warning(event, nats=self.cfg.nats, error=repr(e), times=due)
                await asyncio.sleep(1.0)
        if nc is None:
            return
        await changed(True)
        js = nc.jetstream(timeout=5)
        tasks = [self._outputs(nc)]
        if self.centre:
            tasks += [self._consume(js), self._put_versions(js)]
        else:
            tasks += [self._forward(js), self._watch_versions(js)]
        try:
            await asyncio.gather(*tasks)
        finally:
            try:  # what was published (outputs, acks) goes out; then close, unanswered fetches and all
                await asyncio.wait_for(nc.flush(timeout=2), 3)
            except Exception:
                pass
            await nc.close()

    async def _retrying(self, what: str, step: Any) -> None:
        """Run ``step()`` until the stop flag; a failure is logged (rate-limited) and tried again in 0.5 s."""
        while not self.stopping.is_set():
            try:
                if not await step():
                    await asyncio.sleep(0.05)
            except Exception as e:
                if due := self.warn.due((what, type(e).__name__), 1):
                    self.log.warning("network_retry", stage=what, error=repr(e)[:300], times=due)
                await asyncio.sleep(0.5)

    async def _ensure_stream(self, js: Any) -> None:
        from nats.js.api import RetentionPolicy, StreamConfig

        c = self.cfg
        # A work queue: a message stays until the centre's consumer acks it (after its commit), so the stream
        # holds only what the centre has not stored yet, however long the centre is away. De-duplication by
        # message ID for 10 minutes; the centre's unique key beyond.
        want = StreamConfig(
            name=c.stream,
            subjects=[f"{EVENTS}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            num_replicas=c.replicas,
            duplicate_window=600.0,
        )
        try:
            await js.stream_info(c.stream)
        except Exception:
            await js.add_stream(want)

    # station: the outbox
    async def _forward(self, js: Any) -> None:
        db = Store(self.state, readonly=True)  # this thread's own connection: WAL readers never block the writer
        ready = False

        async def step() -> bool:
            nonlocal ready
            if not ready:
                await self._ensure_stream(js)
                ready = True
            rows = db.outbox(self.acked, 256, self.cfg.forward_raw)
            if not rows:
                return False
            msgs = [encode_event(self.cfg.station, r, self.features or {}) for r in rows]
            acks = await asyncio.gather(
                # no Nats-Msg-Id: the server's de-duplication compares IDs alone, so another station's forged ID
                # could make it drop this event; the centre's unique key (station, sensor, seq) drops resends
                *(js.publish(s, b, timeout=5) for s, b, _ in msgs),
                return_exceptions=True,
            )
            mark, ok = self.acked, 0
            for r, a in zip(rows, acks, strict=True):
                if isinstance(a, BaseException):
                    break
                mark, ok = r[0], ok + 1
            self.acked = mark
            self.metrics.net_forwarded.inc(ok)
            if ok < len(rows):
                failed = next(a for a in acks if isinstance(a, BaseException))
                raise failed if isinstance(failed, Exception) else RuntimeError(repr(failed))
            return True

        try:
            await self._retrying("forward", step)
        finally:
            db.close()

    async def _outputs(self, nc: Any) -> None:
        async def step() -> bool:
            n = 0
            while n < 1000:
                try:
                    subject, body = self.outputs.get_nowait()
                except queue.Empty:
                    break
                try:
                    await nc.publish(subject, body)
                    self.metrics.net_outputs.labels("published").inc()
                except Exception:
                    self.metrics.net_outputs.labels("dropped").inc()
                n += 1
            return n > 0

        await self._retrying("outputs", step)
