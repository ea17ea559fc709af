"""Folders of audio files as data sets: real WAV and FLAC files written with soundfile from simulated recordings,
read by the commands that take a data set, and replayed to the real daemon (one per module)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from harness import CONFIG, Daemon, cli

from daemon.data.audio import AudioOptions, read_audio_folder
from daemon.data.datasets import DatasetError, read_folder
from daemon.data.simulate import SimConfig, simulate
from daemon.store.schema import DB_NAME

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
PATTERN = "%Y%m%dT%H%M%S"


def write_folder(root: Path, events: int, fs: float, channels: int, fmt: str, seed: int = 0) -> dict[str, dict]:
    """Simulated events as one file each in ROOT/<species>/<time>.<fmt>; what each file holds, by relative path."""
    d = simulate(SimConfig(events=events, species=3, seed=seed, fs=fs, channels=channels))
    truth = {}
    for i in range(events):
        x = d["samples"][d["offsets"][i] : d["offsets"][i + 1]].reshape(int(d["channels"][i]), -1)
        t = T0.timestamp() + 60 * i + 3600 * seed
        rel = f"{d['label'][i]}/{datetime.fromtimestamp(t, UTC).strftime(PATTERN)}-{seed}.{fmt}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, x.T.astype(np.int16), int(fs), subtype="PCM_16")
        truth[rel] = {"label": str(d["label"][i]), "fs": fs, "samples": x, "t0_ns": int(t) * 10**9}
    return truth


def test_a_folder_of_two_rates_and_formats_reads_as_recordings(tmp_path):
    truth = write_folder(tmp_path, 12, 20_800.0, 2, "wav") | write_folder(tmp_path, 8, 44_100.0, 2, "flac", seed=1)
    opts = AudioOptions(label_from="parent", time_from=f"name:{PATTERN}-%f")
    lines: list[str] = []
    rec, sha = read_folder(tmp_path, opts, lines.append)
    assert lines == [] and len(rec) == 20 and len(sha) == 64
    assert sorted(set(rec.fs.tolist())) == [20_800.0, 44_100.0]
    for i, m in enumerate(rec.meta or []):
        want = truth[m["file"]]
        assert rec.label[i] == want["label"] and rec.fs[i] == want["fs"]
        assert np.array_equal(rec.event(i), want["samples"])  # 16-bit PCM round-trips exactly
        assert (
            rec.t0_ns[i] == want["t0_ns"] + (1 if m["file"].endswith("-1.flac") else 0) * 100_000_000
        )  # "%f" reads "-1" as 0.1 s
    # without --label-from: unlabelled; with the default time: the files' mtimes
    rec2, _ = read_folder(tmp_path, AudioOptions(), lines.append)
    assert set(rec2.label.tolist()) == {""}
    first = tmp_path / (rec2.meta or [])[0]["file"]
    assert rec2.t0_ns[0] == first.stat().st_mtime_ns


def test_one_channel_files_keep_one_channel(tmp_path):
    write_folder(tmp_path, 5, 16_000.0, 1, "wav")
    rec, _ = read_folder(tmp_path, AudioOptions(), print)
    assert rec.channels.tolist() == [1] * 5 and rec.samples.dtype == np.int16


def _bad_files(root: Path, six: bool = True) -> None:
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    sf.write(root / "short.wav", np.zeros((3, 2), np.int16), 20_800, subtype="PCM_16")
    if six:  # readable on its own; bad beside files of another channel count
        sf.write(root / "six.flac", np.random.default_rng(0).integers(-99, 99, (512, 6)).astype(np.int16), 20_800)
    (root / "notes.txt").write_text("field notes\n")


def test_bad_files_are_named_with_their_reason_and_counted(tmp_path):
    write_folder(tmp_path, 6, 20_800.0, 2, "wav")
    _bad_files(tmp_path)
    lines: list[str] = []
    rec, _ = read_folder(tmp_path, AudioOptions(), lines.append)
    assert len(rec) == 6
    said = "\n".join(lines)
    assert "corrupt.wav: cannot be read as audio" in said
    assert "short.wav: 3 samples per channel (need at least 64)" in said
    assert "six.flac: 6 channels where the other files have 2" in said
    assert "notes.txt: not a WAV or FLAC file" in said
    assert lines[-1] == f"4 of 10 files in {tmp_path} could not be read"
    # under a lower channel limit the FLAC is refused for its channels alone; a name the pattern misses is named
    sf.write(tmp_path / "not-a-time.wav", np.ones((100, 2), np.int16), 8000, subtype="PCM_16")
    folder = read_audio_folder(tmp_path, AudioOptions(max_channels=4, time_from=f"name:{PATTERN}-%f"))
    reasons = {p.file: p.reason for p in folder.problems}
    assert reasons["six.flac"] == "6 channels (at most 4 wavelengths allowed)"
    assert "does not match --time-from pattern" in reasons["not-a-time.wav"]


def test_nothing_readable_is_exit_2_naming_every_file(tmp_path):
    _bad_files(tmp_path, six=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("train", str(tmp_path), "--out", str(tmp_path / "m"), "--epochs", "1")
    assert r.returncode == 2, r.stderr
    for name in ("corrupt.wav", "short.wav", "notes.txt"):
        assert name in r.stderr
    assert "could not be read" in r.stderr and "no audio to read" in r.stderr
    r = cli("replay", str(empty), "--connect", "tcp://127.0.0.1:1", "--give-up", "0.5")
    assert r.returncode == 2 and "holds no files" in r.stderr
    r = cli("train", str(tmp_path), "--out", str(tmp_path / "m"), "--time-from", "epoch")
    assert r.returncode == 2 and "--time-from" in r.stderr
    with pytest.raises(DatasetError):
        read_folder(empty, AudioOptions(), print)


def test_train_and_evaluate_on_a_folder(tmp_path):
    write_folder(tmp_path / "d", 60, 20_800.0, 2, "wav")
    write_folder(tmp_path / "d", 30, 44_100.0, 2, "flac", seed=1)
    r = cli("train", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--epochs", "3", "--label-from", "parent")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["data"]["kind"] == "recordings" and len(manifest["data"]["sha256"]) == 64
    r = cli("evaluate", str(tmp_path / "m"), str(tmp_path / "d"), "--label-from", "parent", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["n_events"] == 90
    r = cli("plot", str(tmp_path / "m"), str(tmp_path / "d"), "--out", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("evaluate", str(tmp_path / "m"), str(tmp_path / "d"))  # unlabelled without --label-from
    assert r.returncode == 2 and "labelled" in r.stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon")
    cfg = root / "wingbeat.toml"
    cfg.write_text(CONFIG.replace("first_after = 240", "first_after = 1000000"))
    d = Daemon(root / "state", cfg)
    yield d
    d.stop()


def stored_files(state: Path, sensor: str) -> list[str]:
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT meta FROM events WHERE sensor = ?", (sensor,)).fetchall()
    finally:
        db.close()
    return sorted(json.loads(m)["file"] for (m,) in rows)


def test_replay_a_folder_stores_every_file_once_with_its_name(daemon, tmp_path):
    truth = write_folder(tmp_path, 20, 20_800.0, 2, "wav") | write_folder(tmp_path, 10, 44_100.0, 2, "flac", 1)
    (tmp_path / "corrupt.wav").write_bytes(b"not audio")
    args = ("replay", str(tmp_path), "--connect", daemon.ingest, "--sensor", "folder", "--label-from", "parent")
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert "corrupt.wav: cannot be read as audio" in r.stderr
    assert json.loads(r.stdout)["acked"] == 30
    assert stored_files(daemon.state, "folder") == sorted(truth)
    r = cli(*args, "--json")  # again: every event a duplicate, nothing stored twice
    assert json.loads(r.stdout)["duplicates"] == 30
    assert stored_files(daemon.state, "folder") == sorted(truth)
