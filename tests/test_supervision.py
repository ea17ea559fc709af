"""Training supervision end to end, with the real daemon and its real trainer processes: a fine-tune that replays
older events, a version the gate refuses (the old one keeps serving), configuration that reaches the trainer and
takes effect on SIGHUP, and a trainer that dies with a SIGKILLed daemon without racing its successor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from harness import CONFIG, Daemon, Subscriber, cli, simulate, wait_for

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.store.db import Store
from daemon.store.versions import read_version

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 420, 3, 5)


def models(state: Path) -> dict[int, dict]:
    st = Store(state, readonly=True)
    try:
        return {m["version"]: m for m in st.models()}
    finally:
        st.close()


def send(d: Daemon, sim: Path, start: int, stop: int) -> None:
    rec = read_recordings(sim)
    events = [e for i, e in enumerate(events_of(rec, "s", 0, False)) if start <= i < stop]
    res = replay(iter(events), d.ingest, window=64, ack_timeout_s=10, give_up_s=60)
    assert (res.acked, res.unacked) == (stop - start, 0)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_a_fine_tune_replays_older_events_and_the_gate_keeps_a_worse_version_out(tmp_path, sim):
    conf = tmp_path / "c.toml"
    base = CONFIG.replace("first_after = 240", "first_after = 200").replace("finetune_every_events = 100000", "")
    base = base.replace("gate_rec_tolerance = 1.0", "").replace("first_restarts = 1", "")  # the default: 3
    conf.write_text(base + "finetune_every_events = 100\nmax_events = 200\ngate_rec_tolerance = 0.5\n")
    d = Daemon(tmp_path / "state", conf)
    try:
        send(d, sim, 0, 200)
        wait_for(lambda: d.status()["serving"] == 1, timeout=180, every=1)
        # the first model: three trainings from the first version's seed on (0 + 1, then 100,003 apart), the one
        # whose clusters agree best with the other two's kept; its epochs are reported counted on through them
        v1 = read_version(d.state / "models" / "v1")
        r = v1.manifest["restarts"]
        assert r["seeds"] == [1, 100_004, 200_007] and len(r["agreement"]) == 3
        assert r["agreement"][r["kept"]] == max(r["agreement"]) and v1.manifest["epochs"] == 60
        # a new model finds its groups by density in the features, splits clear groups, and keeps the held-out
        # ELBO's epoch (trainer.recipe)
        cut = v1.manifest["cluster"]
        assert (v1.manifest["train"]["select"], cut["method"], cut["split_silhouette"]) == ("best", "density", 0.65)
        reports = [e for e in d.events() if e.get("event") == "training_epoch" and e.get("model_version") == 1]
        assert [e["epoch"] for e in reports] == [*range(0, 180, 10), 179] and {e["epochs"] for e in reports} == {180}
        started = [e for e in d.events() if e.get("event") == "training_started"]
        assert started[0]["kind"] == "first" and started[0]["epochs"] == 180
        send(d, sim, 200, 300)  # 100 new events: a fine-tune of version 1
        wait_for(lambda: d.status()["serving"] == 2, timeout=180, every=1)
        v2 = read_version(d.state / "models" / "v2")
        assert v2.manifest["kind"] == "finetune" and v2.manifest["parent"] == 1
        assert v2.manifest["restarts"]["seeds"] == [2]  # a fine-tune continues one model, cut as its parent is
        fine_tune = (
            v2.manifest["train"]["select"],
            v2.manifest["cluster"]["method"],
            v2.manifest["cluster"]["split_silhouette"],
        )
        assert fine_tune == ("best", "density", 0.65)
        # 200 events per training: the newest 100 and an even sample of the 200 before them, from the first on
        assert v2.manifest["data"]["first_event"] == 1 and v2.manifest["data"]["last_event"] == 300
        assert v2.manifest["gate_metrics"]["events"] == 200

        # SIGHUP: a gate that tolerates nothing, and a full retrain of 1 epoch — worse than the serving model
        conf.write_text(conf.read_text().replace("gate_rec_tolerance = 0.5", "gate_rec_tolerance = 0.0"))
        conf.write_text(conf.read_text().replace("epochs_full = 60", "epochs_full = 1"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: [e for e in d.events() if e.get("event") == "reloaded"], timeout=30)
        assert cli("retrain", "--state", str(d.state)).returncode == 0
        wait_for(lambda: models(d.state).get(3, {}).get("status") == "rejected", timeout=180, every=1)
        m = models(d.state)
        assert m[3]["kind"] == "full" and "held-out reconstruction error" in m[3]["reason"]
        assert m[2]["status"] == "serving" and d.status()["serving"] == 2
        # a version the gate refuses stays on disk, whole, for inspection: the store's row describes it
        v3 = read_version(d.state / "models" / "v3")
        assert v3.manifest["kind"] == "full" and v3.manifest["epochs"] == 1
        # a full retrain: the new model's rule, one training
        cut = v3.manifest["cluster"]
        assert (v3.manifest["train"]["select"], cut["method"], cut["split_silhouette"]) == ("best", "density", 0.65)
        assert v3.manifest["restarts"]["seeds"] == [3]
        assert v3.manifest["gate_metrics"] == m[3]["metrics"] != {}
        rejected = [e for e in d.events() if e.get("event") == "model_rejected"]
        assert rejected and rejected[0]["model_version"] == 3 and rejected[0]["serving"] == 2

        sub = Subscriber(d.publish)
        time.sleep(0.5)
        send(d, sim, 300, 320)  # the old version still serves what comes now
        got = sub.drain(20, timeout=60)
        assert len(got) == 20 and {g["model_version"] for g in got} == {2}
    finally:
        d.stop()


def test_the_trainer_runs_on_the_daemons_config_data_parallel_under_torchrun(tmp_path, sim):
    """What the trainer trains with comes from the daemon's config objects (epochs, seed, max_events here), and
    with training.nproc = 2 it runs as two ranks (torchrun, gloo on the CPU); rank 0 reports and writes the
    version, which serves like any other."""
    conf = tmp_path / "c.toml"
    conf.write_text(
        CONFIG.replace("epochs_first = 60", "epochs_first = 30") + "nproc = 2\nmax_events = 150\nseed = 11\n"
    )
    d = Daemon(tmp_path / "state", conf)
    try:
        send(d, sim, 0, 240)
        wait_for(lambda: d.status()["serving"] == 1, timeout=240, every=1)
        v1 = read_version(d.state / "models" / "v1")
        assert v1.manifest["ranks"] == 2 and v1.manifest["epochs"] == 30
        assert v1.manifest["gate_metrics"]["events"] == 150
        assert v1.manifest["train"]["seed"] == 11 + 1  # the config's seed plus the version number
        epochs = [e["epoch"] for e in d.events() if e.get("event") == "training_epoch"]
        assert epochs == sorted(set(epochs))  # one rank reports, each epoch once
        assert not list((d.state / "models").glob(".v*"))  # the config file went with the training
    finally:
        d.stop()


def test_a_trainer_dies_with_a_killed_daemon_and_its_number_is_never_reused(tmp_path, sim):
    conf = tmp_path / "c.toml"
    conf.write_text(CONFIG.replace("epochs_first = 60", "epochs_first = 100000"))
    d = Daemon(tmp_path / "state", conf)
    send(d, sim, 0, 240)
    started = wait_for(lambda: [e for e in d.events() if e.get("event") == "training_started"], timeout=60)
    pid = started[0]["pid"]
    assert started[0]["model_version"] == 1 and alive(pid)
    wait_for(lambda: [e for e in d.events() if e.get("event") == "training_epoch"], timeout=60)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_for(lambda: not alive(pid), timeout=10, every=0.1)  # no orphan left to write v1 behind our back

    conf.write_text(CONFIG)
    d2 = Daemon(tmp_path / "state", conf)
    try:
        wait_for(lambda: d2.status()["serving"] == 2, timeout=180, every=1)
        m = models(d2.state)
        assert m[1]["status"] == "failed" and "stopped during this training" in m[1]["reason"]
        assert m[2]["status"] == "serving" and not (d2.state / "models" / "v1").exists()
    finally:
        d2.stop()
    # version 2 was trained by a trainer of the second daemon, not by the first one's: another process, and
    # the killed trainer was gone before it started
    started2 = [e for e in d2.events() if e.get("event") == "training_started"]
    assert [e["model_version"] for e in started2] == [2]
    assert started2[0]["pid"] not in (pid, d2.proc.pid) and not alive(pid)
    assert os.path.exists(d2.state / "models" / "v2")
