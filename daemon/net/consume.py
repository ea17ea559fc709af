"""The centre's durable consumer (DESIGN §9, docs/network.md): fetch the stations' events from JetStream, decode
each message on its own (a malformed one becomes a quarantine row, and is terminated once the batch is stored: it
is never redelivered), hand the batch to the loop, and ack what the loop stored. A coroutine of
``daemon.net.link.NetworkLink``'s thread, kept in its own module."""

from __future__ import annotations

import queue
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from daemon.net.wire import EVENTS, MAX_DELIVER, QUARANTINE_FRAME_BYTES, WireError, decode_event
from daemon.ops.config import Network as NetworkConfig
from daemon.protocol import Pooled, Quarantined


@dataclass
class Batch:
    """Messages fetched at the centre: what to store, what to quarantine, and the messages to ack after."""

    events: list[Pooled] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    msgs: list[tuple[Any, bool]] = field(default_factory=list)  # (message, poison: terminate it, never redeliver)
    event_msg: list[int] = field(default_factory=list)  # index in ``msgs`` of each of ``events``


class PoolConsumer:
    """Mixed into ``NetworkLink``: its configuration, queues, log and retry loop are the link's."""

    cfg: NetworkConfig
    features: dict[str, Any] | None
    pooled: queue.Queue[Batch]
    to_ack: queue.Queue[list[tuple[Any, bool]]]
    log: Any
    warn: Any

    async def _retrying(self, what: str, step: Any) -> None:
        raise NotImplementedError  # NetworkLink's

    async def _ensure_stream(self, js: Any) -> None:
        raise NotImplementedError  # NetworkLink's

    async def _consume(self, js: Any) -> None:
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import AckPolicy, ConsumerConfig

        sub = None

        async def step() -> bool:
            nonlocal sub
            while True:  # ack what the loop committed; terminate poison (quarantined: never to be redelivered)
                try:
                    msgs = self.to_ack.get_nowait()
                except queue.Empty:
                    break
                for m, poison in msgs:
                    await (m.term() if poison else m.ack())
            if sub is None:
                await self._ensure_stream(js)
                # max_deliver: the backstop for a message that takes the process down before it is quarantined
                cfg = ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_ack_pending=20_000, max_deliver=MAX_DELIVER
                )
                c = self.cfg
                sub = await js.pull_subscribe(f"{EVENTS}.>", durable=c.durable, stream=c.stream, config=cfg)
                info = await js.consumer_info(c.stream, c.durable)
                if info.config.max_deliver != MAX_DELIVER:  # a consumer an older version created: updated in place
                    info.config.max_deliver = MAX_DELIVER
                    await js.add_consumer(c.stream, info.config)
            if self.pooled.full():
                return False
            try:
                msgs = await sub.fetch(256, timeout=0.5)
            except NatsTimeout:
                return True
            batch = Batch()
            for m in msgs:
                self._decode(m, batch)
            self.pooled.put(batch, timeout=1.0)  # the loop drains it; full only if the loop is stuck
            return True

        await self._retrying("consume", step)
        try:  # stopping: ack what the loop committed last (what is missed is redelivered and found stored)
            while True:
                for m, poison in self.to_ack.get_nowait():
                    await (m.term() if poison else m.ack())
        except (queue.Empty, Exception):
            pass

    def _decode(self, m: Any, batch: Batch) -> None:
        """One fetched message into the batch: an event, or a quarantine row for a message to terminate. Each in
        its own try, so that no message can drop the others of its batch."""
        try:
            data = bytes(m.data)
            frames = m.subject.encode("utf-8", "backslashreplace")[:256] + b"\x00" + data[:QUARANTINE_FRAME_BYTES]
        except Exception:
            data, frames = b"", b""
        try:
            headers = m.headers or {}
            event = decode_event(data, self.features, m.subject, headers.get("Nats-Msg-Id"))
        except WireError as e:
            reason, detail = e.reason, e.detail
        except Exception as e:  # a bug's, not the sender's: quarantined all the same, never the batch dropped
            reason, detail = "decode", f"{type(e).__name__}: {e}"[:300]
        else:
            batch.event_msg.append(len(batch.msgs))
            batch.events.append(event)
            batch.msgs.append((m, False))
            return
        batch.reasons[reason] += 1
        batch.quarantine.append(Quarantined(reason, detail, None, None, frames[:QUARANTINE_FRAME_BYTES], "nats"))
        batch.msgs.append((m, True))
        if due := self.warn.due(("quarantine", reason), 1):
            self.log.warning("network_quarantined", reason=reason, detail=detail, subject=m.subject, times=due)
