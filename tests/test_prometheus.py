"""The deployment files of docs/metrics.md against the real tools: promtool checks the scrape config and the alert
rules and runs their unit tests; the dashboard and the rules name only metrics the daemon has; the metrics table
matches the exposition. The slow test runs the real daemon scraped by the real ``prometheus`` binary and evaluates
every dashboard query and every alert's signal through Prometheus' HTTP API. Every wait has a timeout."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from harness import ROOT, Daemon, simulate, wait_for

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.ops.metrics import Metrics, MetricsServer
from daemon.protocol import decode_ack
from model.cluster import present_min

PROM = ROOT / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "wingbeat.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DOC = ROOT / "docs" / "metrics.md"

# The alert convention (alerts.yml's header): `<signal> <op> <threshold>`, the last comparison against a number.
ALERT_EXPR = re.compile(
    r"^(?P<signal>.+)\s(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$", re.S
)
# Grafana's variables, replaced by what Grafana would send for "all daemons" and a range the slow test's data spans.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "5m", "$__interval": "1m", "${instance}": ".*", "$instance": ".*"}
METRIC = re.compile(r"\b(?:wingbeat_[a-z0-9_]+|up)\b")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: these tests run the real Prometheus tools "
            "(Debian: apt-get install prometheus; `make test-deps` installs it)"
        )
    return path


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def grafana_expr(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the tests do not know in {expr!r}"
    return expr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title / legend, PromQL with the variables replaced) for every target of every panel."""
    out = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):  # a row has none; an open row's panels follow it in "panels"
            out.append((f"{p['title']} / {t.get('legendFormat') or t['refId']}", grafana_expr(t["expr"])))
    return out


def registry_names() -> set[str]:
    """Every sample name the daemon's registry exposes (counters with _total, histograms' _bucket/_sum/_count)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


def doc_table() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table of every metric: name -> (type, labels)."""
    section = DOC.read_text().split("## Every metric", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(wingbeat_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} twice in {DOC}"
            out[m.group(1)] = (m.group(2), set(re.findall(r"`(\w+)`", m.group(3))))
    return out


def exposition_types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


# ---- fast: the files against promtool and the registry ------------------------------------------------------------
def test_promtool_accepts_the_scrape_config_and_the_alert_rules():
    promtool = tool("promtool")
    r = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=PROM, capture_output=True, text=True)
    assert r.returncode == 0 and "1 rule files found" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=PROM, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(alert_rules())} rules found" in r.stdout + r.stderr
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = conf["scrape_configs"][0]
    assert job["job_name"] == "wingbeat" and job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests():
    files = ["alerts_test.yml", "alerts_test_days.yml"]
    r = subprocess.run(
        [tool("promtool"), "test", "rules", *files], cwd=PROM, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.count("SUCCESS") == len(files), r.stdout + r.stderr
    cases = [c for f in files for t in yaml.safe_load((PROM / f).read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"no unit test shows {rule['alert']} firing"
        assert any(not c["exp_alerts"] for c in mine), f"no unit test shows {rule['alert']} quiet"
        firing = next(c for c in mine if c["exp_alerts"])["exp_alerts"][0]
        assert set(firing["exp_annotations"]) == {"summary", "description"}  # rendered text checked, not just labels


def test_alert_rules_follow_the_convention():
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for r in rules:
        m = ALERT_EXPR.match(r["expr"].strip())
        assert m, f"{r['alert']}: expr is not `<signal> <op> <threshold>`: {r['expr']!r}"
        assert m["signal"].count("(") == m["signal"].count(")"), r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), f"{r['alert']}: for: {r.get('for')!r}"
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        text = r["annotations"]["summary"] + r["annotations"]["description"]
        assert "$value" in text, f"{r['alert']}: the annotations do not say the value"
    wanted = {  # the list, each by its rule
        "daemon down": "WingbeatDown",
        "sensor silent": "WingbeatSensorSilent",
        "rejects": "WingbeatRejectsHigh",
        "training failing": "WingbeatTrainingFailing",
        "model not updated": "WingbeatModelStale",
        "store near its size limit": "WingbeatRawStoreAtLimit",
        "store near its disk limit": "WingbeatDiskNearFull",
        "latency p99": "WingbeatPublishLatencyHigh",
        "novel-event rate": "WingbeatNovelRateHigh",
        "a new cluster appears": "WingbeatNewCluster",
        "coverage stays low": "WingbeatCoverageLow",
    }
    assert set(wanted.values()) <= {r["alert"] for r in rules}


def test_dashboard_is_well_formed_and_provisioned():
    d = dashboard()
    assert d["uid"] == "wingbeat" and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["instance"]["datasource"] == ds
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        if p["type"] == "row":  # open, so that its panels are top-level ones and their queries are checked here
            assert not p["collapsed"] and not p["panels"] and p["gridPos"]["w"] == 24, p["title"]
            cells |= {(x, p["gridPos"]["y"]) for x in range(24)}
            continue
        assert p["datasource"] == ds, f"panel {p['title']!r}: datasource {p.get('datasource')}"
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), f"panel {p['title']!r}, target {t['refId']}"
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    titles = " ".join(p["title"].lower() for p in panels)
    topics = ["ingest", "rejects", "gaps", "publish", "ack", "queue", "store", "model version", "β", "losses"]
    diversity = ["biodiversity", "hill numbers", "abundance", "diel", "coverage"]
    for topic in [*topics, "cluster", "novel", "training runs", "durations", *diversity]:  # the issues' lists
        assert topic in titles, f"no panel about {topic}"
    source = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["uid"] == variables["datasource"]["current"]["value"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "wingbeat.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].endswith("/dashboards/wingbeat")


def test_dashboard_and_alerts_name_only_metrics_the_daemon_has():
    known = registry_names() | {"up"}
    used: dict[str, str] = {}
    for where, expr in panel_queries():
        used |= {name: where for name in METRIC.findall(expr)}
    d = dashboard()
    for a in d["annotations"]["list"]:
        used |= {name: f"annotation {a['name']}" for name in METRIC.findall(a.get("expr", ""))}
    used |= {name: "variable instance" for name in METRIC.findall(d["templating"]["list"][1]["definition"])}
    for r in alert_rules():
        used |= {name: r["alert"] for name in METRIC.findall(r["expr"])}
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"metrics the daemon does not expose: {unknown}"
    assert len(used) > 30  # the dashboard and the rules cover most of the registry


def test_metrics_doc_lists_exactly_the_exposition():
    m = Metrics()
    server = MetricsServer(m, "127.0.0.1", 0)
    server.start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode()
    finally:
        server.stop()
    live = exposition_types(text)
    doc = doc_table()
    assert set(doc) == set(live), f"only in docs: {set(doc) - set(live)}; only in /metrics: {set(live) - set(doc)}"
    assert {n: t for n, (t, _) in doc.items()} == live
    # labels: the collectors' label names, and those of samples (the build info's)
    labels: dict[str, set[str]] = {}
    for name, collector in m.registry._names_to_collectors.items():
        labels.setdefault(name, set()).update(getattr(collector, "_labelnames", ()))
    for family in m.registry.collect():
        for s in family.samples:
            labels.setdefault(s.name, set()).update(k for k in s.labels if k != "le")
    for name, (_, doc_labels) in doc.items():
        assert doc_labels == labels[name], f"{name}: docs say labels {doc_labels}, the registry has {labels[name]}"


# ---- slow: a real Prometheus scraping a real daemon ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """The real ``prometheus`` on a free loopback port, its TSDB and log under ``work``."""

    def __init__(self, work: Path, config: Path) -> None:
        binary = tool("prometheus")
        self.log_path = work / "prometheus.log"
        for _ in range(3):  # the free port may be taken between finding it and binding it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={work / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--storage.tsdb.retention.time=1h",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_for(self._ready, timeout=60)
                return
            except RuntimeError:
                continue
        raise RuntimeError(f"prometheus did not start: {self.log_path.read_text()[-2000:]}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            body = urllib.request.urlopen(url, timeout=10).read()
        except urllib.error.HTTPError as e:  # a bad query is a 400 with the error in the JSON body
            body = e.read()
        return json.loads(body)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def values(self, expr: str) -> list[float]:
        r = self.query(expr)
        return [float(s["value"][1]) for s in r["data"]["result"]] if r["status"] == "success" else []

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def summarise(result: dict[str, Any]) -> str:
    """A query's result in one line: each series' distinguishing labels and its value."""
    if result["status"] != "success":
        return f"ERROR {result.get('errorType')}: {result.get('error')}"
    data = result["data"]
    if data["resultType"] == "scalar":
        return data["result"][1]
    parts = []
    for s in data["result"]:
        labels = ",".join(f"{k}={v}" for k, v in s["metric"].items() if k not in ("job", "instance", "__name__"))
        value = float(s["value"][1])
        shown = f"{value:.4g}" if abs(value) < 1e6 or not math.isfinite(value) else f"{value:.4e}"
        parts.append(f"{labels}={shown}" if labels else shown)
    return "; ".join(parts) if parts else "(empty)"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 200, 3, 1)


# as harness.CONFIG, smaller: a first model after 120 events, trained briefly
CONFIG = """
[ingest]
endpoint = "tcp://127.0.0.1:0"
[publish]
endpoint = "tcp://127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[training]
cpu_share = 1.0
first_after = 120
epochs_first = 20
finetune_every_events = 100000
full_every_events = 100000
finetune_every_s = 0.0
[diversity]
summary_every_s = 2
"""

SUMMARY_FIELDS = {"station", "start", "end", "events", "novel", "model_version", "abundance", "observed", "estimated"}
SUMMARY_FIELDS |= {"ci95", "coverage"}


def diversity_summaries(endpoint: str) -> zmq.Socket[bytes]:
    """A subscriber to the daemon's diversity summaries (topic ``diversity.``), as ``wingbeat tail`` subscribes."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"diversity.")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def summaries_of(sock: zmq.Socket[bytes], events: int, timeout: float) -> list[dict[str, Any]]:
    """The summaries of the short windows until they hold ``events`` events, or ``timeout`` seconds."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while sum(s["events"] for s in got if s["window_s"] == 2) < events and time.monotonic() < deadline:
        if sock.poll(200):
            topic, body = sock.recv_multipart()
            assert topic == b"diversity.local"
            got.append(json.loads(body))
    return got


def check_live_diversity(d: Daemon, prom: Prometheus, summaries: zmq.Socket[bytes]) -> dict[str, Any]:
    """The gauges of the last hour (every output of the test) against the observed Hill numbers of the published
    labels in the store, through Prometheus; the summaries on the XPUB cover every event once, with every field."""
    from daemon.report.windows import diversity_windows

    (window,) = diversity_windows(d.state, "all", as_served=True)
    assert window["events"] == 200 and window["pending"] == 0

    def gauges() -> dict[str, float]:
        r = prom.query('wingbeat_diversity{window="1h"}')["data"]["result"]
        return {f"q{s['metric']['q']}": float(s["value"][1]) for s in r}

    def agree() -> bool:
        g = gauges()
        return len(g) == 3 and all(math.isclose(g[q], window["observed"][q], rel_tol=1e-9) for q in g)

    try:
        wait_for(agree, timeout=20, every=0.5)
    except RuntimeError:
        raise AssertionError(f"gauges {gauges()} != the store's {window['observed']}") from None
    abundance = {
        s["metric"]["cluster"]: float(s["value"][1])
        for s in prom.query('wingbeat_cluster_abundance{window="1h"}')["data"]["result"]
    }
    assert {c: n for c, n in abundance.items() if n} == {c: float(n) for c, n in window["abundance"].items()}
    assert prom.values('wingbeat_diversity_novel_events{window="1h"}') == [float(window["novel"])]
    got = summaries_of(summaries, 200, timeout=20)
    short = [s for s in got if s["window_s"] == 2]
    assert sum(s["events"] for s in short) == 200, got
    for s in short:
        assert SUMMARY_FIELDS <= set(s) and s["station"] == "" and s["model_version"] is not None, s
        assert s["events"] == s["novel"] + sum(s["abundance"].values()) and s["end"] > s["start"], s
        need = present_min(sum(s["abundance"].values()))  # the clusters present: strays are not counted
        assert s["observed"]["q0"] == sum(n >= need for n in s["abundance"].values()) and 0 <= s["coverage"] <= 1, s
        assert s["stray"] == sum(n for n in s["abundance"].values() if n < need), s
    total: dict[str, int] = {}
    for s in short:
        for c, n in s["abundance"].items():
            total[c] = total.get(c, 0) + n
    assert total == window["abundance"]
    return {"gauges": gauges(), "summaries": len(short)}


def send_bad_messages(endpoint: str) -> list[str]:
    """Three messages the daemon must reject; returns the reasons it acked them with."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    header = {"v": 1, "sensor": "trap-1", "seq": 10_000, "t0_ns": 1, "fs": 20800, "dtype": "int16", "shape": [1, 100]}
    bad = [
        [b"rec.trap-1", b"{nope", b""],
        [b"rec.trap-1", json.dumps({**header, "v": 9}).encode(), b"\0" * 200],
        [b"rec.trap-1", json.dumps(header).encode(), b"\0" * 3],
    ]
    for frames in bad:
        sock.send_multipart(frames)
    reasons = []
    while len(reasons) < len(bad) and sock.poll(10_000):
        ack = decode_ack(sock.recv_multipart())
        assert ack is not None and ack["status"] == "rejected"
        reasons.append(ack["reason"])
    sock.close()
    return sorted(reasons)


@pytest.mark.slow
def test_a_real_prometheus_scraping_the_daemon_answers_every_panel_and_alert(tmp_path, sim):
    t_start = time.monotonic()
    conf = tmp_path / "wingbeat.toml"
    conf.write_text(CONFIG)
    d = Daemon(tmp_path / "state", conf)
    prom: Prometheus | None = None
    summaries = diversity_summaries(d.publish)
    follow: subprocess.Popen[str] | None = None
    try:
        # The repository's rules, with one change: WingbeatDown's `for: 1m` becomes 1 s so the kill at the end
        # fires it within the test. Everything else (exprs, labels, annotations, other `for:`) is as shipped.
        rules = yaml.safe_load(ALERTS.read_text())
        for rule in rules["groups"][0]["rules"]:
            if rule.get("alert") == "WingbeatDown":
                rule["for"] = "1s"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, allow_unicode=True, sort_keys=False))
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(tmp_path / "alerts.yml")],
                    "scrape_configs": [{"job_name": "wingbeat", "static_configs": [{"targets": [d.metrics]}]}],
                }
            )
        )
        prom = Prometheus(tmp_path, tmp_path / "prometheus.yml")
        wait_for(lambda: prom.values('up{job="wingbeat"}') == [1.0], timeout=30)

        # 150 events of one sensor (a first training starts at 120), three rejected messages, then the last 50
        # with seq 153… : a gap of 3. The counters start at 0 in Prometheus before any of it happens.
        rec = read_recordings(sim)
        first = replay(itertools.islice(events_of(rec, "trap-1", 0, False), 150), d.ingest, window=32, give_up_s=60)
        assert (first.acked, first.rejected) == (150, {})
        assert send_bad_messages(d.ingest) == ["json", "length", "version"]
        wait_for(lambda: prom.values("wingbeat_model_version") == [1.0], timeout=150, every=1)
        wait_for(lambda: len(prom.values("wingbeat_training_loss")) == 3, timeout=30)
        # `wingbeat tail --topic diversity.` subscribed (the daemon counts it) before the last events arrive
        tail = ["tail", "--connect", d.publish, "--topic", "diversity.", "--count", "1", "--timeout", "60"]
        follow = subprocess.Popen([sys.executable, "-m", "daemon.cli", *tail], stdout=subprocess.PIPE, text=True)
        wait_for(lambda: prom.values("wingbeat_subscriptions") == [2.0], timeout=30, every=0.5)
        rest = itertools.islice(events_of(rec, "trap-1", 3, False), 150, None)
        second = replay(rest, d.ingest, window=32, give_up_s=60)
        assert (second.acked, second.rejected) == (50, {})
        wait_for(lambda: prom.values("sum(wingbeat_events_stored_total)") == [200.0], timeout=30)
        wait_for(lambda: prom.values("wingbeat_backlog_events") == [0.0], timeout=30)
        wait_for(lambda: prom.values("sum(wingbeat_sequence_gaps_total)") == [3.0], timeout=30)
        diversity = check_live_diversity(d, prom, summaries)
        tailed, _ = follow.communicate(timeout=60)
        (line,) = tailed.splitlines()
        assert SUMMARY_FIELDS <= set(json.loads(line)), line
        time.sleep(3)  # a few more scrapes after the last change, so every rate() has points on both sides of it

        table: list[dict[str, Any]] = []
        for where, expr in panel_queries():
            table.append({"kind": "panel", "name": where, "expr": expr, "result": prom.query(expr)})
        for a in dashboard()["annotations"]["list"]:
            if "expr" in a:
                expr = grafana_expr(a["expr"])
                table.append({"kind": "annotation", "name": a["name"], "expr": expr, "result": prom.query(expr)})
        for rule in alert_rules():
            m = ALERT_EXPR.match(rule["expr"].strip())
            assert m is not None
            whole = prom.query(rule["expr"])  # reported, not asserted: a p99 may be high on a busy box
            met = whole["status"] == "success" and bool(whole["data"]["result"])
            table.append(
                {
                    "kind": "alert signal",
                    "name": rule["alert"],
                    "expr": m["signal"],
                    "result": prom.query(m["signal"]),
                    "condition": f"{m['op']} {m['threshold']}: {'MET' if met else 'not met'}",
                }
            )
        instances = prom.api("label/instance/values", **{"match[]": "wingbeat_build_info"})

        # every rule loaded and evaluated without error
        loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"] if r["type"] == "alerting"]
        assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in alert_rules())
        broken = {r["name"]: r.get("lastError") for r in loaded if r["health"] != "ok"}

        # the doc's table against the daemon's own /metrics
        live = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert set(exposition_types(live)) == set(doc_table())

        # the end: the daemon killed, Prometheus says it is down
        d.proc.kill()
        d.proc.wait(timeout=30)
        t_kill = time.monotonic()

        def down() -> list[dict[str, Any]]:
            alerts = prom.api("alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "WingbeatDown" and a["state"] == "firing"]

        fired = wait_for(down, timeout=60, every=0.5)
        fired_after = time.monotonic() - t_kill
        table.append(
            {
                "kind": "alert",
                "name": "WingbeatDown after SIGKILL",
                "expr": "/api/v1/alerts",
                "result": {"status": "success", "data": {"resultType": "vector", "result": []}},
                "fired": fired[0],
            }
        )
    finally:
        summaries.close()
        if follow is not None and follow.poll() is None:
            follow.kill()
            follow.wait(timeout=10)
        if prom is not None:
            prom.stop()
        if d.proc.poll() is None:
            d.stop()
        elif not d.log.closed:
            d.log.close()

    # the table for the record: `pytest -s` shows it, the JSON keeps it
    out = tmp_path / "prometheus-values.json"
    rows = [{**row, "value": summarise(row["result"])} for row in table]
    for row in rows:
        if "condition" in row:
            row["value"] += f"  ({row['condition']})"
    rows[-1]["value"] = f"firing {fired_after:.1f} s after the kill: {fired[0]['annotations']['summary']}"
    out.write_text(json.dumps([{k: v for k, v in r.items() if k != "result"} for r in rows], indent=2))
    width = max(len(r["name"]) for r in rows)
    print(f"\n{'what':<13} {'name':<{width}}  value (Prometheus {prom.url if prom else ''}, ranges of 5m)")
    for r in rows:
        print(f"{r['kind']:<13} {r['name']:<{width}}  {r['value']}")
    print(f"instance variable: {instances['data']}; live diversity: {diversity}")
    print(f"values written to {out}; test took {time.monotonic() - t_start:.0f} s")

    assert not broken, f"alert rules that failed to evaluate: {broken}"
    assert instances["status"] == "success" and instances["data"] == [d.metrics]
    for r in rows[:-1]:
        res = r["result"]
        assert res["status"] == "success", f"{r['kind']} {r['name']}: {r['expr']} → {r['value']}"
        assert res["data"]["result"], f"{r['kind']} {r['name']} returned no data: {r['expr']}"
        values = [float(s["value"][1]) for s in res["data"]["result"]]
        assert all(math.isfinite(v) for v in values), f"{r['kind']} {r['name']}: {r['expr']} → {r['value']}"
    assert fired[0]["labels"]["severity"] == "critical" and fired[0]["labels"]["instance"] == d.metrics
