"""The daemon's configuration: one TOML file, every key with a default, flags on top. Validation names the key."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """One line naming the key and the problem."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as systemd's ``CPUAffinity=`` or a container sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Ingest:
    endpoint: str = "tcp://127.0.0.1:5555"  # ROUTER: acks after commit
    plain_endpoint: str = ""  # optional PULL for senders that cannot read acks ("" = off)
    max_message_bytes: int = 16 * 1024 * 1024
    max_channels: int = 8
    min_samples: int = 64
    batch_max: int = 256  # micro-batch: up to this many events …
    batch_wait_ms: float = 5.0  # … or this long after the first, whichever first
    # featurise the next micro-batch in these threads while this one commits (0 = off); by default one core fewer
    # than the daemon may use (at most 4): the serving thread holds one, and featurises the parts of a batch still
    # queued when it needs them (on 2 cores one thread, docs/RESULTS.md)
    featurise_threads: int = field(default_factory=lambda: max(1, min(4, usable_cores() - 1)))
    queue_per_sender: int = 1000  # messages queued per connection before ZeroMQ stops reading it (backpressure)
    quarantine_keep: int = 100_000  # rows of quarantine kept (oldest dropped first)
    quarantine_frame_bytes: int = 65_536  # bytes of each rejected message kept


@dataclass(frozen=True)
class Publish:
    endpoint: str = "tcp://127.0.0.1:5556"
    hwm: int = 10_000  # outputs queued per subscriber in ZeroMQ; a subscriber this far behind holds publishing …
    queue_max: int = 100_000  # … and outputs wait in the daemon, up to this many; beyond, the oldest are dropped
    heartbeat_s: float = 5.0  # ping subscribers; one silent for 3 × this is disconnected (0 = off)
    sndbuf_bytes: int = 0  # kernel send buffer per subscriber connection (0 = the system's; it may grow to MBs)
    start_grace_s: float = 1.0  # after start, publish nothing this long: subscribers of before a restart reconnect


@dataclass(frozen=True)
class Metrics:
    listen: str = "127.0.0.1:9464"  # HOST:PORT of /metrics and /healthz ("" = off)
    max_sensors: int = 64  # sensors with their own label; the rest are counted as "other"


@dataclass(frozen=True)
class Store:
    raw_max_age_days: float = 30.0  # 0 = keep raw samples forever (until the size cap)
    raw_max_bytes: int = 2 * 1024**3
    min_free_bytes: int = 64 * 1024**2  # below this free space on the state's disk, raw samples are not kept


@dataclass(frozen=True)
class Training:
    first_after: int = 2000  # events before the first training
    finetune_every_events: int = 5000
    finetune_every_s: float = 3600.0  # 0 = only by events
    full_every_events: int = 50_000
    epochs_first: int = 300
    # The first model is trained this many times from other seeds, and the training whose clusters agree best with
    # the others' serves (model.build): on simulated deployments mean ARI 0.680 → 0.731, daily q1 error 31 → 28 %
    # (tuning seeds; docs/RESULTS.md). The first training then takes this many times as long.
    first_restarts: int = 3
    epochs_finetune: int = 50
    epochs_full: int = 300
    max_events: int = 50_000  # events per training (the newest, plus an even sample of older ones)
    drift_novelty: float = 0.05  # retrain when the recent novel fraction exceeds this …
    drift_rec_ratio: float = 2.0  # … or recent reconstruction error exceeds this × the model's training error
    drift_window: int = 2000  # events over which drift is measured
    gate_rec_tolerance: float = 0.10  # a new model may reconstruct held-out events at most 10 % worse
    gate_ari_tolerance: float = 0.02  # … and lose at most this much ARI on labelled events
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # torch threads of the trainer process (of each rank)
    # A training on the CPU rests between epochs so that it keeps at most this share of a core busy (1 = no rest):
    # on a small box a trainer that fills every idle cycle, even at SCHED_IDLE, costs serving its p99 (the VM's
    # cores are shared below it); 0.3 kept p99 under 100 ms at 500 events/s on 2 cores (docs/RESULTS.md)
    cpu_share: float = 0.3
    nproc: int = 1  # ranks of a training: > 1 trains data-parallel under torchrun (one per GPU with CUDA)
    idle: bool = True  # the trainer under SCHED_IDLE: it gets a core only when serving leaves one free
    nice: int = 10  # the trainer's CPU priority below the serving loop's where SCHED_IDLE is off or refused
    backoff_s: float = 30.0  # after a failed training, wait this long (doubling, up to 1 h) before the next
    seed: int = 0

    def total_epochs(self, kind: str) -> int:
        """Epochs a training of ``kind`` (first, finetune, full) runs in all: a first model's restarts run
        ``epochs_first`` each, one after the other (the trainer reports its epochs counted on through them)."""
        per = {"first": self.epochs_first, "finetune": self.epochs_finetune, "full": self.epochs_full}[kind]
        return per * (self.first_restarts if kind == "first" else 1)


@dataclass(frozen=True)
class Security:
    curve: bool = False  # ZeroMQ CURVE (encryption + client keys) on both ingest endpoints and publish
    server_secret_key: str = ""  # the daemon's secret certificate (NAME.key_secret, from `wingbeat keys`)
    clients_dir: str = ""  # public certificates (*.key) of the senders and subscribers allowed to connect


@dataclass(frozen=True)
class Network:
    """A station of a network, or its centre (DESIGN §9, docs/network.md). ``nats = ""``: a single daemon."""

    nats: str = ""  # NATS server URL(s), comma-separated: nats://127.0.0.1:4222, tls://host:4222
    station: str = ""  # this station's name ([A-Za-z0-9_-]); "" at the centre
    role: str = "station"  # station | centre (``wingbeat central`` sets centre)
    creds: str = ""  # NATS credentials file (user JWT + nkey seed, from nsc): accounts in operator mode
    nkey: str = ""  # or an nkey seed file (SU…): a server that lists users by public nkey, without JWTs
    tls_ca: str = ""  # CA bundle that signed the server's certificate
    tls_cert: str = ""  # client certificate and key, where the server asks for them
    tls_key: str = ""
    forward_raw: bool = False  # forward raw samples too (features and metadata always)
    train_locally: bool = False  # a station trains on its own events besides taking the network's versions
    replicas: int = 1  # JetStream stream and bucket replicas (3 on a three-node cluster)
    stream: str = "WINGBEAT_EVENTS"
    bucket: str = "wingbeat-models"
    durable: str = "wingbeat-central"  # the centre's consumer
    keep_versions: int = 5  # the bucket keeps the newest N versions; the centre deletes older ones after each put


@dataclass(frozen=True)
class Diversity:
    """Live diversity (docs/diversity.md): summaries at each close of a UTC window of wall-clock time."""

    summary_every_s: int = 3600  # the short summary window (3600: each UTC hour); a divisor of 86400
    summary_day: bool = True  # also a summary of each UTC day


@dataclass(frozen=True)
class Config:
    state_dir: str = "wingbeat-state"
    model: str = ""  # a model version directory to start from ("" = the newest good one in the state, or none)
    ingest: Ingest = field(default_factory=Ingest)
    publish: Publish = field(default_factory=Publish)
    metrics: Metrics = field(default_factory=Metrics)
    store: Store = field(default_factory=Store)
    training: Training = field(default_factory=Training)
    security: Security = field(default_factory=Security)
    network: Network = field(default_factory=Network)
    diversity: Diversity = field(default_factory=Diversity)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHECKS: dict[str, tuple[Any, str]] = {
    "ingest.max_message_bytes": (lambda v: v >= 1024, "must be at least 1024"),
    "ingest.max_channels": (lambda v: 1 <= v <= 64, "must be in 1–64"),
    "ingest.min_samples": (lambda v: v >= 8, "must be at least 8"),
    "ingest.batch_max": (lambda v: 1 <= v <= 10_000, "must be in 1–10000"),
    "ingest.batch_wait_ms": (lambda v: 0 <= v <= 1000, "must be in 0–1000"),
    "ingest.featurise_threads": (lambda v: 0 <= v <= 16, "must be in 0–16"),
    "ingest.quarantine_keep": (lambda v: v >= 1, "must be at least 1"),
    "ingest.quarantine_frame_bytes": (lambda v: v >= 0, "must be ≥ 0"),
    "publish.hwm": (lambda v: v >= 1, "must be at least 1"),
    "publish.queue_max": (lambda v: v >= 1, "must be at least 1"),
    "publish.heartbeat_s": (lambda v: 0 <= v <= 3600, "must be in 0–3600"),
    "publish.start_grace_s": (lambda v: 0 <= v <= 600, "must be in 0–600"),
    "publish.sndbuf_bytes": (lambda v: 0 <= v <= 1 << 30, "must be in 0–1073741824"),
    "ingest.queue_per_sender": (lambda v: 1 <= v <= 1_000_000, "must be in 1–1000000"),
    "metrics.max_sensors": (lambda v: v >= 1, "must be at least 1"),
    "store.raw_max_age_days": (lambda v: v >= 0, "must be ≥ 0"),
    "store.raw_max_bytes": (lambda v: v >= 0, "must be ≥ 0"),
    "store.min_free_bytes": (lambda v: v >= 0, "must be ≥ 0"),
    "training.first_after": (lambda v: v >= 16, "must be at least 16"),
    "training.finetune_every_events": (lambda v: v >= 1, "must be at least 1"),
    "training.finetune_every_s": (lambda v: v >= 0, "must be ≥ 0"),
    "training.full_every_events": (lambda v: v >= 1, "must be at least 1"),
    "training.epochs_first": (lambda v: v >= 1, "must be at least 1"),
    "training.first_restarts": (lambda v: v >= 1, "must be at least 1"),
    "training.epochs_finetune": (lambda v: v >= 1, "must be at least 1"),
    "training.epochs_full": (lambda v: v >= 1, "must be at least 1"),
    "training.max_events": (lambda v: v >= 16, "must be at least 16"),
    "training.drift_novelty": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "training.drift_rec_ratio": (lambda v: v > 1, "must be > 1"),
    "training.drift_window": (lambda v: v >= 10, "must be at least 10"),
    "training.gate_rec_tolerance": (lambda v: v >= 0, "must be ≥ 0"),
    "training.gate_ari_tolerance": (lambda v: 0 <= v <= 2, "must be in 0–2"),
    "training.device": (lambda v: v in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
    "training.threads": (lambda v: 1 <= v <= 256, "must be in 1–256"),
    "training.nproc": (lambda v: 1 <= v <= 64, "must be in 1–64"),
    "training.cpu_share": (lambda v: 0.05 <= v <= 1, "must be in 0.05–1"),
    "training.nice": (lambda v: 0 <= v <= 19, "must be in 0–19"),
    "training.backoff_s": (lambda v: v >= 0, "must be ≥ 0"),
    "network.station": (lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v), "must be [A-Za-z0-9_-]{1,64}"),
    "network.role": (lambda v: v in ("station", "centre"), "must be station or centre"),
    "network.replicas": (lambda v: 1 <= v <= 5, "must be in 1–5"),
    "network.keep_versions": (lambda v: v >= 1, "must be ≥ 1 (stations take the newest)"),
    "network.stream": (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v), "must be [A-Za-z0-9_-]{1,64}"),
    "network.bucket": (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v), "must be [A-Za-z0-9_-]{1,64}"),
    "network.durable": (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v), "must be [A-Za-z0-9_-]{1,64}"),
    "diversity.summary_every_s": (lambda v: v >= 1 and 86400 % v == 0, "must be ≥ 1 and divide 86400 (one day)"),
}


def _endpoint_ok(v: str, optional: bool) -> bool:
    if optional and v == "":
        return True
    return v.startswith(("tcp://", "ipc://", "inproc://")) and len(v) > 6


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for name in known:
        if name not in data:
            continue
        v, path = data[name], f"{prefix}{name}"
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(v, dict):
                raise ConfigError(f"{path}: must be a table, got {type(v).__name__}")
            values[name] = _build(type(default), v, path + ".")
            continue
        want = type(default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not want:
            raise ConfigError(f"{path}: must be {want.__name__}, got {type(v).__name__} {v!r}")
        check = CHECKS.get(path)
        if check and not check[0](v):
            raise ConfigError(f"{path}: {check[1]}, got {v!r}")
        values[name] = v
    return cls(**values)


def validate(cfg: Config) -> Config:
    if not _endpoint_ok(cfg.ingest.endpoint, optional=False):
        raise ConfigError(
            f"ingest.endpoint: not a ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH): {cfg.ingest.endpoint!r}"
        )
    if not _endpoint_ok(cfg.ingest.plain_endpoint, optional=True):
        raise ConfigError(f"ingest.plain_endpoint: not a ZeroMQ endpoint: {cfg.ingest.plain_endpoint!r}")
    if not _endpoint_ok(cfg.publish.endpoint, optional=False):
        raise ConfigError(f"publish.endpoint: not a ZeroMQ endpoint: {cfg.publish.endpoint!r}")
    if cfg.metrics.listen:
        host, _, port = cfg.metrics.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"metrics.listen: must be HOST:PORT, got {cfg.metrics.listen!r}")
    if cfg.security.curve:
        for key in ("server_secret_key", "clients_dir"):
            if not getattr(cfg.security, key):
                raise ConfigError(f"security.{key}: must be set when security.curve is true")
    if not cfg.state_dir:
        raise ConfigError("state_dir: must not be empty")
    n = cfg.network
    if n.nats:
        for url in n.nats.split(","):
            if not url.strip().startswith(("nats://", "tls://")):
                raise ConfigError(f"network.nats: must be nats://HOST:PORT or tls://HOST:PORT, got {url.strip()!r}")
        if n.role == "station" and not n.station:
            raise ConfigError("network.station: must be set when network.nats is (the station's name)")
        if bool(n.tls_cert) != bool(n.tls_key):
            raise ConfigError("network.tls_cert, network.tls_key: go together (a client certificate and its key)")
        if n.creds and n.nkey:
            raise ConfigError("network.creds, network.nkey: one or the other (a creds file holds its own nkey)")
        for key in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(n, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"network.{key}: no such file: {path!r}")
    return cfg


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The effective config: defaults, then the file, then ``overrides`` (dotted keys → values, None = unset)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(_build(Config, data, ""))


# Keys a SIGHUP may change (prefixes of dotted keys); everything else needs a restart.
RELOADABLE = ("training", "store", "ingest.batch_max", "ingest.batch_wait_ms", "ingest.quarantine_keep")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """A config from nested dicts (``Config.to_dict()``, a TOML document), validated like a file."""
    return validate(_build(Config, data, ""))


def reload(
    old: Config, path: Path | None, overrides: dict[str, Any] | None = None
) -> tuple[Config, list[str], list[str]]:
    """What a SIGHUP applies: the file read again (flags still win), keeping every changed key that is not
    RELOADABLE at its running value. Returns (the new config, keys applied, keys that need a restart); raises
    ConfigError for a bad file (the running config stays)."""
    new = load(path, overrides) if path is not None else old
    old_d, new_d = flatten(old.to_dict()), flatten(new.to_dict())
    changed = sorted(k for k in new_d if new_d[k] != old_d.get(k))
    applied = [k for k in changed if k.startswith(RELOADABLE)]
    restart = [k for k in changed if k not in applied]
    merged: dict[str, Any] = {}
    for k, v in {**new_d, **{k: old_d[k] for k in restart}}.items():
        node = merged
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return from_dict(merged), applied, restart


def to_toml(cfg: Config) -> str:
    """The effective config as TOML, for ``check-config``."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in cfg.to_dict().items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)
