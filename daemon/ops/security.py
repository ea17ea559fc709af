"""ZeroMQ CURVE for ingest and publish: the daemon's key pair, the directory of allowed client keys (``zmq.auth``),
and a count of the connections refused.

Certificates are the text files of ``zmq.auth.create_certificates``: ``NAME.key`` holds a public key,
``NAME.key_secret`` the public and the secret key. The daemon needs its own secret certificate and a directory of
client public certificates; a client needs its own secret certificate and the daemon's public one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from daemon.ops import logs
from daemon.ops.config import Security as SecurityConfig
from daemon.ops.metrics import Metrics


class KeyFileError(ValueError):
    """A missing or unreadable certificate, said in one line."""


def create_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; refuse to overwrite a key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise KeyFileError(f"{p}: exists; not overwriting a key (remove it first to make a new pair)")
    pub, sec = zmq.auth.create_certificates(str(directory), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (a NAME.key_secret file is needed here, not NAME.key)")
    return public, secret


def load_public(path: str | Path) -> bytes:
    return _load(path)[0]


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"{p}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (ValueError, OSError) as e:
        raise KeyFileError(f"{p}: not a ZeroMQ certificate ({e})") from None
    if public is None or len(public) != 40:
        raise KeyFileError(f"{p}: not a ZeroMQ certificate (no 40-character public-key)")
    return public, secret


def client_keys(directory: str | Path) -> int:
    """How many public certificates ``directory`` holds (the daemon refuses to start with none)."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"{d}: no such directory of client keys")
    return sum(1 for _ in d.glob("*.key"))


def secure_client(sock: zmq.Socket[bytes], client_secret: str | Path, server_public: str | Path) -> None:
    """Make ``sock`` a CURVE client of the daemon whose public certificate is ``server_public``."""
    public, secret = load_secret(client_secret)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = load_public(server_public)


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
# key_not_allowed: a CURVE client whose key is not in the allowed directory (the authenticator said no).
# handshake: anything else that fails before a message is read: a plaintext client, a client with the wrong server
# key, a malformed greeting. (ZeroMQ reports these as protocol errors or without detail, depending on timing.)
REASONS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key_not_allowed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake",
}


@dataclass
class Guard:
    """Server side: the ZAP authenticator and one monitor per secured socket, drained by the serving loop."""

    ctx: zmq.Context[zmq.Socket[bytes]]
    server_secret: str
    clients_dir: str
    on_refused: Callable[[str, str, int], None]  # (socket name, reason, count since last drain)
    monitors: list[tuple[str, zmq.Socket[bytes]]] = field(default_factory=list)
    auth: ThreadAuthenticator | None = None

    def start(self) -> None:
        self.public, self.secret = load_secret(self.server_secret)
        if client_keys(self.clients_dir) == 0:
            raise KeyFileError(f"{self.clients_dir}: holds no client public keys (*.key): no one could connect")
        self.auth = ThreadAuthenticator(self.ctx, log=_quiet())
        self.auth.start()
        self.reload_clients()

    def reload_clients(self) -> int:
        """Read the allowed client keys again (SIGHUP); returns how many there are."""
        assert self.auth is not None
        n = client_keys(self.clients_dir)  # raises before anything changes if the directory is gone
        self.auth.configure_curve(domain="*", location=self.clients_dir)
        return n

    def secure(self, sock: zmq.Socket[bytes], name: str) -> None:
        """Before ``bind``: CURVE server on ``sock``, with a monitor counting refused handshakes."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        self.monitors.append((name, sock.get_monitor_socket(HANDSHAKE_EVENTS)))

    def drain(self) -> None:
        """Count the handshakes refused since the last call (never blocks)."""
        for name, mon in self.monitors:
            counts: dict[str, int] = {}
            while mon.poll(0):
                event = recv_monitor_message(mon)
                reason = REASONS.get(zmq.Event(event["event"]), "handshake")
                counts[reason] = counts.get(reason, 0) + 1
            for reason, n in counts.items():
                self.on_refused(name, reason, n)

    def stop(self) -> None:
        for _, mon in self.monitors:
            mon.close(linger=0)
        self.monitors.clear()
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def _quiet() -> logging.Logger:
    """The authenticator logs every refusal at debug level; the daemon counts and logs them itself."""
    log = logging.getLogger("wingbeat.zap")
    log.setLevel(logging.WARNING)
    return log


def loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this host only (ipc/inproc, or tcp on a loopback address)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class SocketSecurity:
    """What the daemon does to each socket before ``bind``: CURVE with the allow-list when ``security.curve`` is
    on (refused handshakes counted and logged), else a warning for an endpoint reachable beyond this host."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], cfg: SecurityConfig, metrics: Metrics) -> None:
        self.metrics = metrics
        self.log = logs.get()
        self.refused_log = logs.RateLimited(10.0)
        self.guard: Guard | None = None
        if cfg.curve:  # before any socket: a bad key is a start-up error, said in one line
            self.guard = Guard(ctx, cfg.server_secret_key, cfg.clients_dir, self._refused)
            self.guard.start()

    def secure(self, sock: zmq.Socket[bytes], name: str, endpoint: str) -> None:
        if self.guard is not None:
            self.guard.secure(sock, name)
        elif not loopback(endpoint):
            self.log.warning(
                "insecure_endpoint",
                socket=name,
                endpoint=endpoint,
                detail="reachable beyond this host without CURVE: anyone who can connect can send or read; "
                "see docs/security.md",
            )

    def _refused(self, name: str, reason: str, n: int) -> None:
        self.metrics.refused.labels(name, reason).inc(n)
        if due := self.refused_log.due((name, reason), n):
            self.log.warning("connection_refused", socket=name, reason=reason, count=due)

    def drain(self) -> None:
        if self.guard is not None:
            self.guard.drain()

    def reload(self) -> None:
        """SIGHUP: read the allowed client keys again; a bad directory keeps the keys loaded before."""
        if self.guard is None:
            return
        try:
            self.log.info("client_keys_reloaded", allowed=self.guard.reload_clients())
        except ValueError as e:
            self.log.error("client_keys_reload_failed", error=str(e), detail="keeping the keys loaded before")

    def stop(self) -> None:
        if self.guard is not None:
            self.guard.stop()
