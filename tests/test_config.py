import subprocess
import sys

import pytest

from daemon.ops.config import Config, ConfigError, load, to_toml


def write(tmp_path, text):
    p = tmp_path / "wingbeat.toml"
    p.write_text(text)
    return p


def test_defaults_serve_on_loopback():
    cfg = load(None)
    assert cfg == Config()
    assert "127.0.0.1" in cfg.ingest.endpoint and "127.0.0.1" in cfg.publish.endpoint
    assert cfg.metrics.listen.startswith("127.0.0.1:")


def test_file_then_flags(tmp_path):
    p = write(tmp_path, "[training]\nfirst_after = 500\nepochs_first = 20\n[ingest]\nbatch_wait_ms = 2\n")
    cfg = load(p, {"training.first_after": 100, "state_dir": None})
    assert cfg.training.first_after == 100  # the flag wins
    assert cfg.training.epochs_first == 20 and cfg.ingest.batch_wait_ms == 2.0  # int accepted for a float
    assert load(write(tmp_path, to_toml(cfg))) == cfg  # the printed config reads back the same


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[training]\nfirst_after = 'many'\n", "training.first_after: must be int"),
        ("[training]\nfirst_afterr = 5\n", "training.first_afterr: unknown key"),
        ("[trainingg]\n", "trainingg: unknown key"),
        ("[training]\ndrift_novelty = 2.0\n", "training.drift_novelty: must be in (0, 1]"),
        ("[training]\ndevice = 'tpu'\n", "training.device: must be auto, cpu or cuda"),
        ("[training]\nfirst_restarts = 0\n", "training.first_restarts: must be at least 1"),
        ("[ingest]\nendpoint = 'localhost:5'\n", "ingest.endpoint: not a ZeroMQ endpoint"),
        ("[metrics]\nlisten = 'nope'\n", "metrics.listen: must be HOST:PORT"),
        ("training = 3\n", "training: must be a table"),
        ("[ingest\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        load(write(tmp_path, text))


def test_check_config_command(tmp_path):
    ok = write(tmp_path, "[publish]\nhwm = 10\n")
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", str(ok)], capture_output=True, text=True)
    assert r.returncode == 0 and "hwm = 10" in r.stdout
    bad = write(tmp_path, "[publish]\nhwm = 0\n")
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "wingbeat: error: publish.hwm: must be at least 1, got 0"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (3, 2), (4, 3), (16, 4)])
def test_featurise_threads_default_to_one_core_fewer_than_the_daemon_may_use(monkeypatch, cores, threads):
    from daemon.ops import config

    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert config.Ingest().featurise_threads == threads
    assert config.Ingest(featurise_threads=3).featurise_threads == 3  # a configured count is kept


def test_a_first_training_runs_its_epochs_once_a_restart(tmp_path):
    t = load(write(tmp_path, "[training]\nepochs_first = 20\nfirst_restarts = 4\nepochs_full = 7\n")).training
    assert (t.total_epochs("first"), t.total_epochs("finetune"), t.total_epochs("full")) == (80, 50, 7)
    assert Config().training.first_restarts == 3 and Config().training.total_epochs("first") == 900
