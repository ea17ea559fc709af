"""Files per second into the daemon from a folder of WAV files: ``wingbeat replay DIR`` and ``wingbeat watch``.

    python bench/files.py [--files 500] [--seconds 0.25] [--channels 2] [--fs 20800]

Writes ``--files`` 16-bit WAV files of simulated events (``--seconds`` long) into a temporary folder, starts a
daemon on loopback (no training), then measures, each against its own sensor name:

1. ``replay DIR``: reading the folder (every file decoded) and sending it, acked events per second of wall time of
   the whole command (Python start-up included, printed separately);
2. ``watch DIR --once --poll 0.05``: a journal line fsync'd per file before its send and per ack, and each file
   moved to ``sent/`` after its ack; files per second of the whole command (two polls of start-up included).

Each also as measured inside the command (replay's send phase after the folder is read; watch's loop from its
first poll), since a Python command's start-up (imports: numpy, scipy, soundfile) weighs on a few hundred files.

Both are end to end through the daemon's commit (``synchronous=FULL``). One line of JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.data.simulate import SimConfig, simulate

CONFIG = """
[ingest]
endpoint = "tcp://127.0.0.1:0"
[publish]
endpoint = "tcp://127.0.0.1:0"
[metrics]
listen = ""
[training]
first_after = 100000000
"""


def wingbeat(*args: str) -> tuple[float, str]:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"wingbeat {args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.monotonic() - start, r.stdout


def write_files(folder: Path, n: int, seconds: float, channels: int, fs: float) -> None:
    d = simulate(
        SimConfig(events=n, species=4, seed=0, fs=fs, channels=channels, min_duration=seconds, max_duration=seconds)
    )
    for i in range(n):
        x = d["samples"][d["offsets"][i] : d["offsets"][i + 1]].reshape(channels, -1)
        sf.write(folder / f"{i:06d}.wav", x.T.astype(np.int16), int(fs), subtype="PCM_16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=0.25)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--fs", type=float, default=20_800.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wingbeat-bench-files-"))
    daemon = None
    try:
        data = tmp / "rec"
        data.mkdir()
        write_files(data, args.files, args.seconds, args.channels, args.fs)
        (tmp / "wingbeat.toml").write_text(CONFIG)
        state = tmp / "state"
        log = open(tmp / "daemon.log", "w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(tmp / "wingbeat.toml"), "--state", str(state)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (state / "endpoints.json").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the daemon did not start: {(tmp / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.2)
        ingest = json.loads((state / "endpoints.json").read_text())["ingest"]
        startup, _ = wingbeat("--help")
        t_replay, out = wingbeat("replay", str(data), "--connect", ingest, "--sensor", "bench-replay", "--json")
        acked, send_replay = json.loads(out)["acked"], json.loads(out)["seconds"]
        t_watch, out = wingbeat(
            "watch", str(data), "--connect", ingest, "--sensor", "bench-watch", "--once", "--poll", "0.05", "--json"
        )
        watched, send_watch = json.loads(out.splitlines()[-1])["acked"], json.loads(out.splitlines()[-1])["seconds"]
        result = {
            "files": args.files,
            "seconds_per_file": args.seconds,
            "channels": args.channels,
            "fs": args.fs,
            "cli_startup_s": round(startup, 2),
            "replay_dir_files_per_s": round(acked / t_replay, 1),
            "replay_dir_s": round(t_replay, 2),
            "watch_files_per_s": round(watched / t_watch, 1),
            "watch_s": round(t_watch, 2),
            "replay_dir_send_files_per_s": round(acked / send_replay, 1),
            "watch_loop_files_per_s": round(watched / send_watch, 1),
        }
        print(
            f"replay DIR: {acked} files in {t_replay:.1f} s = {result['replay_dir_files_per_s']} files/s; "
            f"watch --once: {watched} files in {t_watch:.1f} s = {result['watch_files_per_s']} files/s "
            f"(whole commands, start-up included); once started: replay sends {result['replay_dir_send_files_per_s']} "
            f"files/s, watch's loop (polls, journal fsyncs, moves) {result['watch_loop_files_per_s']} files/s"
        )
        print(json.dumps(result))
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
