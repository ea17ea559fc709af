"""structlog set-up: JSON lines on stdout when it is not a terminal (journald, pipes), readable lines on one."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog


def configure(level: str = "info", json: bool | None = None) -> None:
    as_json = not sys.stdout.isatty() if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(**bind: Any) -> Any:
    return structlog.get_logger().bind(**bind)


class RateLimited:
    """Log a recurring event at most once per ``every_s`` per key, with the count in between."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.last: dict[tuple[str, ...], float] = {}
        self.pending: dict[tuple[str, ...], int] = {}

    def due(self, key: tuple[str, ...], n: int) -> int:
        """Add ``n``; returns the count to log now, or 0 to stay quiet."""
        self.pending[key] = self.pending.get(key, 0) + n
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every_s:
            return 0
        self.last[key] = now
        return self.pending.pop(key)
