"""The store's tables of model versions and settings (``models``, ``meta.features``): which version serves, which
were claimed, refused or failed, and how the stored features were made. Methods of ``daemon.store.db.Store``, kept in
their own module."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from typing import Any


class ModelTables:
    """Mixed into ``Store``: its connection and transaction helper are the store's."""

    db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError  # Store's

    def record_model(self, version: int, status: str, kind: str, metrics: dict[str, Any], reason: str = "") -> None:
        with self._tx():
            if status == "serving":
                self.db.execute("UPDATE models SET status='retired' WHERE status='serving'")
            self.db.execute(
                "INSERT OR REPLACE INTO models VALUES (?,?,?,?,?,?)",
                (version, status, kind, time.time_ns(), json.dumps(metrics, default=str), reason),
            )

    def claim_version(self, at_least: int, kind: str) -> int:
        """The next model version number, claimed in one transaction (a ``training`` row): never above
        ``at_least`` − 1 (what is on disk) nor any recorded version, and never handed out twice, even to a
        daemon started after this one was killed mid-training."""
        with self._tx():
            top = int(self.db.execute("SELECT coalesce(max(version), 0) FROM models").fetchone()[0])
            n = max(top + 1, at_least)
            self.db.execute("INSERT INTO models VALUES (?, 'training', ?, ?, '{}', '')", (n, kind, time.time_ns()))
        return n

    def abandon_claims(self, reason: str) -> list[int]:
        """Mark versions still claimed for a training as failed (their trainer is gone); return them."""
        with self._tx():
            gone = [v for (v,) in self.db.execute("SELECT version FROM models WHERE status = 'training'")]
            self.db.execute("UPDATE models SET status = 'failed', reason = ? WHERE status = 'training'", (reason,))
        return gone

    def feature_config(self) -> dict[str, Any] | None:
        """How the stored features were made (``FeatureConfig`` fields), or None before it was recorded."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'features'").fetchone()
        return json.loads(row[0]) if row else None

    def set_feature_config(self, features: dict[str, Any]) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('features', ?)", (json.dumps(features),))

    def models(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT version, status, kind, created_ns, metrics, reason FROM models ORDER BY version")
        return [
            {
                "version": r[0],
                "status": r[1],
                "kind": r[2],
                "created_ns": r[3],
                "metrics": json.loads(r[4]),
                "reason": r[5],
            }
            for r in rows
        ]
