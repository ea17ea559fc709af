"""``make demo`` is the README's first command: ``wingbeat demo`` end to end, on fewer events, as a user runs it."""

import json
import re
import shutil
from datetime import UTC, datetime
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
        _assert_diversity_table(out, Path(root.group(1)) if root else Path())
    finally:
        if root:
            shutil.rmtree(root.group(1), ignore_errors=True)


ROW = re.compile(
    r"^(\d{4}-\d\d-\d\d) +(\d+) +(\d+) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+|∞) "
    r"\[([\d.]+|∞), ([\d.]+|∞)\]$",
    re.M,
)


def _assert_diversity_table(out: str, root: Path) -> None:
    """The demo ends with one row per simulated UTC day: the served clusters' Hill numbers beside the truth's."""
    tail = out[out.index("diversity per UTC day of event time") :]
    assert "estimated q0 [95 % CI]" in tail, tail
    truth = json.loads((root / "truth.truth.json").read_text())
    days = {
        datetime.fromtimestamp(d["start_ns"] // 10**9, UTC).date().isoformat(): d for d in truth["daily"] if d["events"]
    }
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(tail)}
    assert sorted(rows) == sorted(days) and len(rows) == truth["days"] == 3, tail
    for day, (events, found_q0, true_q0, f1, t1, f2, t2, est, lo, hi) in rows.items():
        assert int(events) == days[day]["events"]
        assert int(found_q0) >= 1  # richness of the clusters: a positive integer
        assert int(true_q0) == len(days[day]["abundance"])  # the species that flew that day
        assert abs(float(t1) - days[day]["hill"]["q1"]) < 0.006 and abs(float(t2) - days[day]["hill"]["q2"]) < 0.006
        assert int(found_q0) >= float(f1) >= float(f2) >= 1.0  # Hill numbers fall with the order q
        assert "∞" not in (est, lo, hi) and float(lo) <= float(est) <= float(hi) and float(est) >= int(found_q0)
    state = re.search(r"more: wingbeat diversity --state (\S+) --by day", tail)
    assert state and re.search(rf"wingbeat report --state {re.escape(state.group(1))} --out \S+report.html", tail)
    # the table's found richness is what ``wingbeat diversity`` reports from the same store
    r = cli("diversity", "--state", state.group(1), "--by", "day", "--as-served", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    served = {w["start"][:10]: w["observed"]["q0"] for w in map(json.loads, r.stdout.splitlines()) if "start" in w}
    assert {d: int(row[1]) for d, row in rows.items()} == {d: int(q0) for d, q0 in served.items()}
