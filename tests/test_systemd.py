"""The daemon under systemd (DESIGN §7): the unit file, the sd_notify protocol, the install scripts.

No systemd runs here (a container), so the test stands in for it where the daemon meets it: ``systemd-analyze
verify`` reads the unit; a datagram socket the test binds is the ``$NOTIFY_SOCKET`` of the real daemon; the
install scripts run into a temporary root. Every receive and wait has a timeout."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from harness import CONFIG, ROOT, Daemon, wait_for

from daemon.ops.config import Config, Ingest, Publish
from daemon.ops.config import Metrics as M
from daemon.ops.systemd import watchdog_interval
from daemon.protocol import Event, decode_ack, encode_ingest
from daemon.serve.service import Service
from daemon.store.db import DB_NAME, Store

UNIT = ROOT / "systemd" / "wingbeat.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → keys → values in order (a key may repeat, and an empty value is kept: ``Key=`` resets)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


# ---- the unit file --------------------------------------------------------------------------------------------
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0027",
    "DevicePolicy": "closed",
    "User": "wingbeat",
    "Group": "wingbeat",
    "StateDirectory": "wingbeat",
    "ConfigurationDirectory": "wingbeat",
}


def test_unit_is_notify_with_watchdog_and_hardened():
    service = parse_unit(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    watchdog = service["WatchdogSec"][0]
    assert watchdog.endswith("s") and 10 <= int(watchdog[:-1]) <= 120
    assert service["Restart"] == ["on-failure"] and service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"] == [
        "/opt/wingbeat/venv/bin/wingbeat run --config /etc/wingbeat/wingbeat.toml --state /var/lib/wingbeat"
    ]
    assert int(service["TimeoutStopSec"][0].rstrip("s")) <= 90
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{key}: want {value!r}, got {service.get(key)}"
    allowed = {v.split()[0] for v in service["DeviceAllow"]}
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"} <= allowed
    # left out on purpose, each with its reason in the file: they break the GPU or torch
    for key in ("PrivateDevices", "MemoryDenyWriteExecute", "DynamicUser"):
        assert key not in service
    env = " ".join(service["Environment"])
    assert "OPENBLAS_NUM_THREADS=1" in env and "OMP_NUM_THREADS=1" in env


def _verify(unit: Path) -> list[str]:
    """``systemd-analyze verify`` on one unit file: the lines it says about that unit.

    What works in a container without systemd as init (systemd 252 here): ``--man=no`` (the check of man:
    Documentation= pages needs man-db; the unit names none, but other units it loads may), nothing else. It does
    not look User= up, so the wingbeat user need not exist; it does check that ExecStart's program exists and is
    executable, so the test points it at this venv's ``wingbeat``. It may print warnings about system units it
    loads beside ours (targets, other services); only lines naming our file count.
    """
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (make test-deps)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    exe = Path(sys.executable).parent / "wingbeat"
    assert os.access(exe, os.X_OK), f"{exe}: the console script of this venv"
    text = UNIT.read_text()
    assert "/opt/wingbeat/venv/bin/wingbeat" in text
    unit = tmp_path / "wingbeat.service"
    unit.write_text(text.replace("/opt/wingbeat/venv/bin/wingbeat", str(exe)))
    assert _verify(unit) == []
    # the check sees mistakes: a misspelt key and a missing program are reported against the file
    broken = tmp_path / "broken" / "wingbeat.service"
    broken.parent.mkdir()
    broken.write_text(text.replace("ProtectHome=yes", "ProtecHome=yes"))
    said = " ".join(_verify(broken))
    assert "ProtecHome" in said and "/opt/wingbeat/venv/bin/wingbeat" in said


def test_watchdog_interval_is_half_of_systemds():
    pid = os.getpid()
    assert watchdog_interval({}, pid) == 2.0  # not under systemd's watchdog: the old 2 s
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}, pid) == 2.0  # not ours
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid) == 2.0


# ---- sd_notify: the real daemon, a socket in systemd's place ----------------------------------------------------
class NotifySocket:
    """What systemd's end of ``$NOTIFY_SOCKET`` sees: (monotonic time, message, endpoints.json existed) per
    datagram, read by a thread with a timeout on every receive."""

    def __init__(self, address: str, state: Path) -> None:
        self.address = address  # what the daemon gets: a path, or '@name' for the abstract namespace
        self.state = state
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str, bool]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.done.is_set():
            try:
                data, _ = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            bound = (self.state / "endpoints.json").exists()
            with self.lock:
                self.got.append((time.monotonic(), data.decode(), bound))

    def messages(self) -> list[tuple[float, str, bool]]:
        with self.lock:
            return list(self.got)

    def lines(self, key: str, since: float = 0.0) -> list[tuple[float, str]]:
        """``key=value`` lines of the messages after ``since``, with their arrival times."""
        return [
            (t, line)
            for t, msg, _ in self.messages()
            if t > since
            for line in msg.split("\n")
            if line.startswith(key + "=")
        ]

    def wait(self, line: str, since: float = 0.0, timeout: float = 20.0) -> float:
        """The arrival time of the first message after ``since`` holding ``line``."""
        key = line.split("=")[0]
        return wait_for(lambda: next((t for t, x in self.lines(key, since) if x == line), None), timeout, every=0.05)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "wingbeat.toml"
    p.write_text(CONFIG)
    return p


WATCHDOG_USEC = 1_000_000  # as if WatchdogSec=1s: the daemon says WATCHDOG=1 every 0.5 s


@pytest.mark.slow
def test_ready_watchdog_reload_and_stop_reach_the_notify_socket(tmp_path, config):
    state = tmp_path / "state"
    notify = NotifySocket(str(tmp_path / "notify"), state)
    d = Daemon(state, config, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        t_ready = notify.wait("READY=1")
        ready = next(msg for t, msg, bound in notify.messages() if t == t_ready)
        assert next(bound for t, _, bound in notify.messages() if t == t_ready)  # sockets bound before READY
        assert "STATUS=0 events/s, no model yet" in ready.split("\n")

        time.sleep(3.0)  # healthy and idle: WATCHDOG=1 every 0.5 s
        pings = [t for t, _ in notify.lines("WATCHDOG", since=t_ready)]
        assert len(pings) >= 4, pings
        assert max(np.diff(pings)) < 1.0  # well inside WatchdogSec
        assert notify.lines("STATUS", since=t_ready)  # the one-line summary comes again, not only at start

        # SIGHUP: RELOADING=1, then READY=1 again once the config is read
        t_hup = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        t_reloading = notify.wait("RELOADING=1", since=t_hup)
        reloading = next(msg for t, msg, _ in notify.messages() if t == t_reloading).split("\n")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        notify.wait("READY=1", since=t_reloading)
        assert any(e.get("event") == "reloaded" for e in d.events())

        t_term = time.monotonic()
        code = d.stop()
        assert code == 0
        notify.wait("STOPPING=1", since=t_term, timeout=5)
    finally:
        if d.proc.poll() is None:
            d.stop()
        notify.close()


def _event(seq: int) -> Event:
    fs, n = 20_800.0, 2048
    t = np.arange(n) / fs
    rng = np.random.default_rng(seq)
    wave = np.sin(2 * np.pi * 600 * t) * np.hanning(n) * 8000 + rng.normal(0, 50, n)
    return Event("stall", seq, time.time_ns(), fs, "int16", 1, wave.astype("<i2")[None, :])


def _healthz(d: Daemon) -> int:
    try:
        return urllib.request.urlopen(f"http://{d.metrics}/healthz", timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_no_watchdog_and_unhealthy_while_the_store_is_locked(tmp_path, config):
    """A real stall: the test holds SQLite's write lock, an event arrives, the loop waits in its commit (the
    store's busy timeout is 30 s). While it waits: no WATCHDOG=1 and /healthz 503 (the heartbeat is older than
    10 s); after the lock goes: the event is stored and acked, WATCHDOG=1 and 200 again. Abstract socket here."""
    state = tmp_path / "state"
    notify = NotifySocket(f"@wingbeat-test-{uuid.uuid4().hex}", state)
    d = Daemon(state, config, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    lock = sqlite3.connect(state / DB_NAME, isolation_level=None, timeout=5)
    try:
        t_ready = notify.wait("READY=1")
        notify.wait("WATCHDOG=1", since=t_ready)
        assert _healthz(d) == 200
        dealer.connect(d.ingest)

        lock.execute("BEGIN EXCLUSIVE")
        t_sent = time.monotonic()
        dealer.send_multipart(encode_ingest(_event(1)))
        wait_for(lambda: _healthz(d) == 503, timeout=20, every=0.5)
        time.sleep(1.0)
        t_release = time.monotonic()
        lock.execute("ROLLBACK")
        assert t_release - t_sent > 10  # the stall lasted long enough to miss many 0.5 s pings
        # after the event reached the loop (it polls every 0.1 s; a batch waits 5 ms more), not one ping
        assert [t for t, _ in notify.lines("WATCHDOG", since=t_sent + 1.0) if t < t_release] == []
        assert dealer.poll(10_000), "no ack after the lock was released"
        assert decode_ack(dealer.recv_multipart()) == {"sensor": "stall", "seq": 1, "status": "stored"}
        notify.wait("WATCHDOG=1", since=t_release, timeout=5)
        wait_for(lambda: _healthz(d) == 200, timeout=5, every=0.2)

        t_term = time.monotonic()
        assert d.stop() == 0
        notify.wait("STOPPING=1", since=t_term, timeout=5)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        dealer.close()
        if d.proc.poll() is None:
            d.stop()
        notify.close()


def test_no_watchdog_while_store_commits_fail_unless_the_disk_is_full(tmp_path, monkeypatch):
    """The other half of "progress": a loop that comes round but whose commits fail (here: the write lock held
    past the busy timeout) is not serving. In process, one housekeeping step at a time, with a store whose busy
    timeout is 0.2 s instead of 30 s: no WATCHDOG=1 and no heartbeat while its transactions fail, both again
    after one commits. A full disk (SQLite's own page limit stands in for it: the same SQLITE_FULL) degrades,
    and a restart would free nothing: the pings go on."""
    state = tmp_path / "state"
    notify = NotifySocket(str(tmp_path / "notify"), state)
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    loopback = "tcp://127.0.0.1:0"
    svc = Service(
        Config(
            state_dir=str(state), ingest=Ingest(endpoint=loopback), publish=Publish(endpoint=loopback), metrics=M("")
        )
    )
    svc.bind()  # real sockets on free ports, as the loop has them
    svc.store.close()
    svc.store = svc.housekeeper.store = Store(state, timeout_s=0.2)
    lock = sqlite3.connect(state / DB_NAME, isolation_level=None, timeout=5)

    def steps(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            svc.housekeep()
            time.sleep(0.02)

    try:
        steps(0.5)
        assert len(notify.lines("WATCHDOG")) >= 3
        lock.execute("BEGIN EXCLUSIVE")
        svc.last_housekeeping = 0.0  # retention (a write) runs in the next step, and fails
        steps(0.3)
        assert "locked" in svc.store.write_error and svc.store.write_error_name == "SQLITE_BUSY"
        t_failing, beat = time.monotonic(), svc.metrics.loop_heartbeat._value.get()
        steps(1.0)
        assert notify.lines("WATCHDOG", since=t_failing) == []
        assert svc.metrics.loop_heartbeat._value.get() == beat  # /healthz goes 503 after 10 s of this
        assert "store failing" in svc.status_line()
        lock.execute("ROLLBACK")
        svc.last_housekeeping = 0.0
        steps(0.5)
        assert svc.store.write_error == "" and len(notify.lines("WATCHDOG", since=t_failing)) >= 2

        pages = svc.store.db.execute("PRAGMA page_count").fetchone()[0]
        svc.store.db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            svc.store.record_model(1, "rejected", "first", {"filler": "x" * 100_000})
        assert svc.store.write_error_name == "SQLITE_FULL"
        t_full = time.monotonic()
        steps(0.5)
        assert len(notify.lines("WATCHDOG", since=t_full)) >= 3
        assert svc.metrics.loop_heartbeat._value.get() > time.time() - 1
        assert "store failing (database or disk is full)" in svc.status_line()
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        svc.store.close()
        svc.ingest.close()
        svc.publisher.close()
        svc.ctx.term()
        notify.close()


# ---- install and uninstall ------------------------------------------------------------------------------------
def _script(name: str, root: Path, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(root), "PREFIX": prefix, "TORCH_SPEC": ""}
    r = subprocess.run(
        [str(ROOT / "deploy" / name), *args], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _venv_seeing_these_packages(venv: Path) -> None:
    """An existing venv (the upgrade path of install.sh) whose dependencies are this test's: a fresh one installs
    torch and the rest from wheels, about 90 s on 2 cores. Only a path is added (no .pth of that directory runs),
    so the editable wingbeat of the development venv is not importable from it: ``daemon`` must be installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


@pytest.mark.slow
def test_install_into_a_temporary_root_keeps_config_and_state(tmp_path):
    root, prefix = tmp_path / "root", "/srv/wingbeat"
    venv = root / prefix.lstrip("/") / "venv"
    _venv_seeing_these_packages(venv)

    r = _script("install.sh", root, prefix)
    assert "systemctl skipped" in r.stdout
    # the project is installed into the venv (not imported from the source tree)
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import daemon; print(daemon.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    # the unit points at PREFIX's venv and the fixed config and state paths
    service = parse_unit((root / "etc/systemd/system/wingbeat.service").read_text())["Service"]
    assert service["ExecStart"] == [
        f"{prefix}/venv/bin/wingbeat run --config /etc/wingbeat/wingbeat.toml --state /var/lib/wingbeat"
    ]
    assert (root / prefix.lstrip("/") / "doc/operations.md").is_file()
    # the config: every default, with the state directory the service uses
    conf = root / "etc/wingbeat/wingbeat.toml"
    written = tomllib.loads(conf.read_text())
    assert written == {**Config().to_dict(), "state_dir": "/var/lib/wingbeat"}
    check = subprocess.run(
        [str(venv / "bin/wingbeat"), "check-config", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr

    # a sysadmin edits the config, the daemon made some state; an upgrade (install again) keeps both
    edited = conf.read_text().replace("first_after = 2000", "first_after = 500")
    conf.write_text(edited)
    store = root / "var/lib/wingbeat" / DB_NAME
    store.parent.mkdir(parents=True)
    store.write_bytes(b"events")
    r = _script("install.sh", root, prefix)
    assert "kept the existing" in r.stdout and "upgrading" in r.stdout
    assert conf.read_text() == edited

    # uninstall: unit and venv gone, state and config kept
    _script("uninstall.sh", root, prefix)
    assert not (root / "etc/systemd/system/wingbeat.service").exists()
    assert not venv.exists() and not (root / prefix.lstrip("/")).exists()
    assert conf.read_text() == edited and store.read_bytes() == b"events"
    # --purge deletes them too
    _script("uninstall.sh", root, prefix, "--purge")
    assert not conf.exists() and not store.exists()
    bad = subprocess.run([str(ROOT / "deploy/uninstall.sh"), "--purgee"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--purgee" in bad.stderr


def test_makefile_install_targets_call_the_scripts():
    r = subprocess.run(
        ["make", "--no-print-directory", "-n", "install", "uninstall", "PURGE=1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["deploy/install.sh", "deploy/uninstall.sh --purge"]
