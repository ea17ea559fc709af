"""``wingbeat report``: a real daemon serves a simulated two-day deployment, the command writes the page, and a
real browser (Debian's chromium, headless, driven by Playwright) opens it offline: no console message of type
error, no page error, no request but the file itself, every section there, every string from the wire escaped.
A centre's store (several stations) adds the station × station dissimilarity."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from harness import CONFIG, Daemon, cli, simulate, wait_for
from test_export import make_state

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START = 1_780_272_000 * 10**9  # 2026-06-01T00:00:00Z
HOUR = 3_600 * 10**9
EVIL = "<img src='http://127.0.0.1:9/x.png'>&amp;"  # a label as a sender may write it: shown, never parsed
N = 480  # events of the deployment
SECTIONS = ["summary", "cards", "abundance", "diel", "diversity", "rarefaction"]


def browser():
    """Chromium, waiting a while for one that is being installed; the test is skipped only when none comes."""
    try:
        wait_for(lambda: CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK), timeout=300, every=5)
    except TimeoutError:
        pytest.skip("no /usr/bin/chromium (make test-deps installs it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def open_page(page_file: Path, screenshot: Path) -> dict:
    """Load the page from disk; what the browser said and fetched, the sections, and the page's text."""
    with browser()() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=60_000)
        try:
            page = b.new_page(viewport={"width": 1200, "height": 900})
            seen: dict = {"console": [], "errors": [], "requests": []}
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(page_file.resolve().as_uri(), wait_until="load", timeout=60_000)
            page.wait_for_timeout(300)  # late requests (a favicon, a lazy image) would show up here
            seen["sections"] = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
            seen["svgs"] = page.eval_on_selector_all("svg", "els => els.length")
            seen["imgs"] = page.eval_on_selector_all("img", "els => els.length")
            seen["text"] = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            b.close()
    return seen


def deployment(tmp_path_factory) -> Path:
    """A simulated recording spread over three UTC days, each species at its own hours, some labels hostile."""
    src = simulate(tmp_path_factory, N, 5, 3)
    with np.load(src, allow_pickle=False) as z:
        d = dict(z)
    rng = np.random.default_rng(5)
    species = {s: i for i, s in enumerate(sorted(set(d["label"].tolist())))}
    peak = np.array([4, 9, 13, 17, 21])[[species[s] for s in d["label"].tolist()]]  # each species' hour of day (UTC)
    hour = (peak + rng.normal(0, 1.5, len(peak))).round().astype(np.int64) % 24
    day = rng.integers(0, 3, len(peak))
    t0 = START + (day * 24 + hour) * HOUR + rng.integers(0, HOUR, len(peak))
    label = d["label"].astype(object)
    label[::9] = EVIL
    label[1::2] = ""  # half unlabelled
    out = src.with_name("deployment.npz")
    d["t0_ns"] = t0
    d["label"] = label.astype(str)
    np.savez_compressed(out, allow_pickle=False, **d)
    return out


@pytest.mark.slow
def test_report_of_a_real_daemon_opens_offline_with_every_section(tmp_path, tmp_path_factory):
    data = deployment(tmp_path_factory)
    model = tmp_path / "model"
    r = cli("train", str(data), "--out", str(model), "--epochs", "60", timeout=600)
    assert r.returncode == 0, r.stderr
    config = tmp_path / "wingbeat.toml"
    config.write_text(CONFIG)
    d = Daemon(tmp_path / "state", config, "--model", str(model))
    try:
        rec = read_recordings(data)
        res = replay(events_of(rec, "trap", 0, False), d.ingest, window=64, ack_timeout_s=10, give_up_s=60)
        assert (res.acked, res.unacked) == (N, 0)
        wait_for(lambda: d.status()["outputs"] == N, timeout=120, every=1)
    finally:
        assert d.stop() == 0
    out = tmp_path / "report.html"
    t = time.monotonic()
    r = cli("report", "--state", str(d.state), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{N} events, 3 days" in r.stdout, r.stdout
    html = out.read_text()
    assert EVIL not in html and "&lt;img src=" in html  # escaped in the page's source
    seen = open_page(out, tmp_path / "report.png")
    assert seen["errors"] == [] and [m for m in seen["console"] if m[0] == "error"] == [], seen
    assert seen["requests"] == [out.resolve().as_uri()], seen["requests"]
    assert seen["sections"] == SECTIONS and seen["svgs"] >= 5 and seen["imgs"] == 0
    text = seen["text"]
    assert str(N) in text and all(f"2026-06-0{k}" in text for k in (1, 2, 3)) and "v1" in text
    assert "wing-beat f0" in text and "Cluster" in text
    assert "<img src='http://127.0.0.1:9/x.png'>&amp;" in text  # shown as the text it is
    if shot := os.environ.get("WINGBEAT_REPORT_SCREENSHOT"):  # docs/report.png is made this way, in 256 colours
        from PIL import Image

        Image.open(tmp_path / "report.png").convert("RGB").quantize(256).save(shot, optimize=True)
    print(f"report of {N} events made and opened in {time.monotonic() - t:.1f} s")


def test_report_at_a_centre_compares_stations_and_filters(tmp_path):
    state = tmp_path / "state"
    events = make_state(state)
    out = tmp_path / "centre.html"
    r = cli("report", "--state", str(state), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{len(events)} events, 3 days" in r.stdout
    seen = open_page(out, tmp_path / "centre.png")
    assert seen["errors"] == [] and [m for m in seen["console"] if m[0] == "error"] == [], seen
    assert seen["requests"] == [out.resolve().as_uri()]
    assert seen["sections"] == [*SECTIONS, "dissimilarity"]
    assert "Aedes <aegypti>" in seen["text"] and "s1, s2" in seen["text"]

    # one station, one day: no comparison, and the counts are that station's
    one = tmp_path / "s1.html"
    r = cli("report", "--state", str(state), "--out", str(one), "--station", "s1", "--since", "2026-06-02",
            "--until", "2026-06-03")  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = sum(s == "s1" and START + 86_400 * 10**9 <= t < START + 2 * 86_400 * 10**9 for s, t, _, _ in events)
    assert f"wrote {one}: {want} events, 1 day " in r.stdout
    assert 'id="dissimilarity"' not in one.read_text()


def test_bad_report_arguments_say_one_line(tmp_path):
    for args, words in (
        (["--state", str(tmp_path / "none"), "--out", str(tmp_path / "r.html")], "no store"),
        (["--state", str(tmp_path), "--out", str(tmp_path / "r.pdf")], "r.pdf"),
        (["--state", str(tmp_path), "--out", str(tmp_path / "r.html"), "--since", "June"], "June"),
    ):
        r = cli("report", *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_page_counts_events_under_the_serving_version_where_history_was_relabelled(tmp_path):
    from daemon.report.export import Query
    from daemon.report.html import read
    from daemon.store.db import Store

    state = tmp_path / "state"
    events = make_state(state)  # version 3 served every event
    store = Store(state)
    try:
        store.record_model(4, "serving", "full", {})
        ids = np.arange(1, 11, dtype=np.int64)  # version 4 has re-labelled the first ten events so far
        store.add_labels(4, ids, np.full(10, 5))
    finally:
        store.close()
    store = Store(state, readonly=True)
    try:
        d = read(store, Query(station="s1"))
    finally:
        store.close()
    s1 = [c for s, _, c, _ in events if s == "s1"]
    assert d.version == 4 and d.versions == {3: len(s1)}
    assert d.cluster.tolist() == [5] * 10 + s1[10:]  # the rest as served, until the re-labelling reaches them
