"""``make demo`` is the README's first command: ``wingbeat demo`` end to end, on fewer events, as a user runs it."""

import re
import shutil
from pathlib import Path

import pytest
from harness import cli


@pytest.mark.slow
def test_the_demo_runs_to_its_score_and_narrates_the_daemon():
    r = cli("demo", "--events", "600", "--rate", "300", timeout=600)
    root = re.search(r"Wingbeat demo in (\S+)", r.stdout)
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = r.stdout
        # the narration reads the daemon's own log: every field it prints is one the daemon writes
        assert re.search(r"▶ training v1 \(first\) on \d+ events, 150 epochs", out), out[-3000:]
        assert re.search(r"epoch +149/150 +β", out) and "✔ model v1 serving" in out
        assert "sent 600, acked 600, resent 0; 600 events published" in out
        score = re.search(r"published clusters vs the simulated species: ARI (-?[\d.]+), AMI (-?[\d.]+)", out)
        assert score and float(score.group(1)) > 0.2, out[-2000:]
        served = re.search(r"published by v\d+: ARI ([\d.]+); wingbeat evaluate .* ARI ([\d.]+)", out)
        assert served and served.group(1) == served.group(2), out[-2000:]  # no loss between offline and serving
        png = re.search(r"plot of model v\d+: (\S+)", out)
        assert png and Path(png.group(1)).stat().st_size > 10_000
    finally:
        if root:
            shutil.rmtree(root.group(1), ignore_errors=True)
