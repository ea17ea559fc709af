"""``wingbeat watch`` against the real daemon (one per module): files that appear while it runs, files still being
written, a kill -9 mid-stream and a restart (every file stored exactly once, nothing acked sent again), a ``sent/``
that cannot be written, and a folder of nothing but bad files. Every wait has a timeout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from harness import CONFIG, ROOT, Daemon, cli, wait_for
from test_audio import stored_files, write_folder

from daemon.cli.watch import journal_path
from daemon.store.schema import DB_NAME


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon")
    cfg = root / "wingbeat.toml"
    cfg.write_text(CONFIG.replace("first_after = 240", "first_after = 1000000"))
    d = Daemon(root / "state", cfg)
    yield d
    d.stop()


def start_watch(folder: Path, daemon: Daemon, sensor: str, *extra: str) -> subprocess.Popen[str]:
    args = ["watch", str(folder), "--connect", daemon.ingest, "--sensor", sensor, "--poll", "0.2", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def sent(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder / "sent").as_posix() for p in (folder / "sent").rglob("*") if p.is_file())


def journal(folder: Path) -> list[dict]:
    return [json.loads(line) for line in journal_path(folder).read_text().splitlines()]


def test_files_that_appear_are_sent_once_complete_and_moved(daemon, tmp_path):
    src, rec = tmp_path / "src", tmp_path / "rec"
    rec.mkdir()
    files = sorted(write_folder(src, 6, 20_800.0, 2, "wav"))
    proc = start_watch(rec, daemon, "w1", "--label-from", "parent")
    try:
        for rel in files[:4]:  # written elsewhere, renamed in: complete when they appear
            (rec / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src / rel, rec / rel)
        part = rec / f"{files[4]}.part"  # a recorder's temporary name, renamed when done
        part.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src / files[4], part)
        growing = rec / "late" / "growing.wav"
        growing.parent.mkdir()
        x = np.random.default_rng(1).integers(-2000, 2000, (4096, 2)).astype(np.int16)
        with sf.SoundFile(growing, "w", 20_800, 2, "PCM_16") as f:
            for i in range(16):  # 1.6 s of growth, eight polls: never the same size on two of them
                f.write(x[i * 256 : (i + 1) * 256])
                f.flush()
                time.sleep(0.1)
            assert "late/growing.wav" not in stored_files(daemon.state, "w1")
            assert ".part" not in " ".join(stored_files(daemon.state, "w1"))
        os.replace(part, rec / files[4])
        want = sorted([*files[:5], "late/growing.wav"])
        wait_for(lambda: sent(rec) == want, 30)
        assert stored_files(daemon.state, "w1") == want
        import sqlite3

        db = sqlite3.connect(f"file:{daemon.state / DB_NAME}?mode=ro", uri=True, timeout=10)
        rows = dict(db.execute("SELECT label, n_samples FROM events WHERE sensor='w1' AND meta LIKE '%growing%'"))
        db.close()
        assert rows == {"late": 4096}  # the whole file, labelled by its folder
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "acked 6 (0 already stored)" in out


def test_kill_9_mid_stream_then_restart_stores_every_file_exactly_once(daemon, tmp_path):
    rec = tmp_path / "rec"
    files = sorted(write_folder(rec, 150, 20_800.0, 1, "wav"))
    proc = start_watch(rec, daemon, "w2", "--window", "1", "--poll", "0.05")
    try:
        wait_for(lambda: len(sent(rec)) >= 10 if (rec / "sent").exists() else False, 60, every=0.01)
    finally:
        proc.kill()
        proc.wait(30)
    before = journal(rec)
    acked = {r["seq"] for r in before if "status" in r}
    assert 10 <= len(acked) < len(files), "the kill must come mid-stream"
    r = cli("watch", str(rec), "--connect", daemon.ingest, "--sensor", "w2", "--once", "--poll", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    after = journal(rec)[len(before) :]
    assert not acked & {x["seq"] for x in after if "status" in x}, "a file acked before the kill was sent again"
    assert res["duplicates"] <= 1  # at most the one file in flight when it died
    assert stored_files(daemon.state, "w2") == files  # each exactly once
    assert sent(rec) == files
    assert sorted({x["seq"] for x in before + after if "file" in x}) == list(range(len(files)))


def test_an_unwritable_sent_folder_is_named_and_the_file_not_resent(daemon, tmp_path):
    rec = tmp_path / "rec"
    files = sorted(write_folder(rec, 2, 20_800.0, 2, "wav"))
    (rec / "sent").write_text("a file where the folder should be\n")
    args = ("watch", str(rec), "--connect", daemon.ingest, "--sensor", "w3", "--once", "--poll", "0.05", "--json")
    r = cli(*args)
    assert json.loads(r.stdout.splitlines()[-1])["acked"] == 2
    for rel in files:
        assert f"{rel}: acked, but cannot be moved to sent/" in r.stderr
    r = cli(*args)  # run again: the journal knows both were acked
    assert json.loads(r.stdout.splitlines()[-1])["acked"] == 0
    assert stored_files(daemon.state, "w3") == files


def test_a_folder_of_bad_files_exits_2_naming_each(daemon, tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    sf.write(rec / "short.flac", np.zeros((3, 1), np.int16), 8000)
    sf.write(rec / "b.wav", np.ones((99, 1), np.int16), 8000, subtype="PCM_16")
    r = cli("watch", str(rec), "--connect", daemon.ingest, "--sensor", "w4", "--once", "--poll", "0.05",
            "--time-from", "name:%Y%m%d")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "corrupt.wav: cannot be read as audio" in r.stderr
    assert "short.flac: 3 samples per channel" in r.stderr
    assert "b.wav: name 'b' does not match --time-from pattern '%Y%m%d'" in r.stderr
    assert "3 files in" in r.stderr and "could not be sent" in r.stderr
    assert stored_files(daemon.state, "w4") == []


TEMPLATE = ROOT / "systemd" / "wingbeat-watch@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (make test-deps)")
def test_the_template_unit_passes_systemd_analyze_verify(tmp_path):
    exe = Path(sys.executable).parent / "wingbeat"
    text = TEMPLATE.read_text()
    assert "/opt/wingbeat/venv/bin/wingbeat watch /var/lib/wingbeat-watch/%i/incoming --sensor %i" in text

    def verify(unit_text: str, where: Path) -> list[str]:
        where.mkdir()
        (where / TEMPLATE.name).write_text(unit_text.replace("/opt/wingbeat/venv/bin/wingbeat", str(exe)))
        instance = where / "wingbeat-watch@lidar1.service"
        r = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=60
        )
        return [line for line in (r.stdout + r.stderr).splitlines() if "wingbeat-watch@" in line]

    assert verify(text, tmp_path / "ok") == []
    said = verify(text.replace("Restart=always", "Restart=always\nRestartz=1"), tmp_path / "broken")
    assert any("Restartz" in line for line in said)  # the check can fail


def test_install_scripts_install_and_remove_the_template():
    install, uninstall = (ROOT / "deploy/install.sh").read_text(), (ROOT / "deploy/uninstall.sh").read_text()
    assert '"$SRC/systemd/wingbeat-watch@.service"' in install and '"$UNIT_DIR/wingbeat-watch@.service"' in install
    assert 'rm -f "$WATCH_UNIT"' in uninstall
    for script in ("install.sh", "uninstall.sh"):
        assert subprocess.run(["sh", "-n", str(ROOT / "deploy" / script)], timeout=30).returncode == 0


def test_keep_and_delete_after_ack_and_a_rejected_file_is_not_resent(daemon, tmp_path):
    from daemon.cli.watch import Watcher

    keep, drop = tmp_path / "keep", tmp_path / "drop"
    files = sorted(write_folder(keep, 3, 20_800.0, 2, "wav"))
    write_folder(drop, 3, 20_800.0, 2, "wav", seed=2)
    sf.write(keep / "flat.wav", np.full((2048, 2), 7, np.int16), 20_800, subtype="PCM_16")  # no spectrum to make
    lines: list[str] = []
    res = Watcher(keep, daemon.ingest, "w5", after_ack="keep", poll_s=0.05, warn=lines.append).run(once=True)
    assert (res.acked, res.rejected, res.unacked) == (3, 1, 0)
    assert any("flat.wav: rejected by the daemon (featurise); not resent" in line for line in lines)
    assert sorted(p.relative_to(keep).as_posix() for p in keep.rglob("*.wav")) == sorted([*files, "flat.wav"])
    again = Watcher(keep, daemon.ingest, "w5", after_ack="keep", poll_s=0.05, warn=lines.append).run(once=True)
    assert (again.acked, again.rejected, again.files) == (0, 0, 0)  # kept files, acked or rejected: not resent
    assert stored_files(daemon.state, "w5") == files
    res = Watcher(drop, daemon.ingest, "w6", after_ack="delete", poll_s=0.05, warn=lines.append).run(once=True)
    assert res.acked == 3 and list(drop.rglob("*.wav")) == []
    with pytest.raises(ValueError, match="sensor 'w6', not 'w7'"):
        Watcher(drop, daemon.ingest, "w7")
    first = Watcher(drop, daemon.ingest, "w6")
    with pytest.raises(ValueError, match="another wingbeat watch is sending this folder"):
        Watcher(drop, daemon.ingest, "w6")
    first.journal.close()
