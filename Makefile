# Wingbeat. `make demo` and `make test` are all a newcomer needs; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := ../shared/data

.PHONY: demo test test-deps faults test-fast lint bench throughput retention headtohead ceiling clean install uninstall

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned to the CPU wheel on this disk; the project's range admits it, so nothing else comes
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wingbeat demo

# What the integration tests run for real beside the daemon: Prometheus and promtool (Debian's package),
# systemd-analyze, nats-server (with JetStream and MQTT, for tests/test_network.py), and chromium (the report opened
# in a real browser, tests/test_report.py). Installed when missing (as root, or with sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
test-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  $(APT) prometheus || { $(SUDO) apt-get update -q && $(APT) prometheus; }
	@command -v systemd-analyze >/dev/null || $(APT) systemd
	@command -v nats-server >/dev/null || test -x /usr/sbin/nats-server || \
	  $(APT) nats-server || { $(SUDO) apt-get update -q && $(APT) nats-server; }
	@command -v chromium >/dev/null || $(APT) chromium || { $(SUDO) apt-get update -q && $(APT) chromium; }

test: $(STAMP) test-deps
	$(BIN)/ruff check model daemon tests bench
	$(BIN)/ruff format --check model daemon tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=25  # two workers, one file each: daemons mostly wait on each other

# The fault-injection suite alone (it also runs in `make test`), then its table: fault, sent, stored, lost, recovery.
faults: $(STAMP) test-deps
	mkdir -p out && rm -f out/faults.jsonl
	WINGBEAT_FAULTS_TABLE=$(CURDIR)/out/faults.jsonl $(BIN)/pytest -q -m faults -n 2
	$(BIN)/python tests/faults_table.py out/faults.jsonl

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check model daemon tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/train_speed.py

# The daemon's acked events/s and send → publish latency (also while a CPU training runs), beside an earlier build
# (BASELINE, a git revision, extracted with git archive) in the same run, rounds interleaved: docs/RESULTS.md
BASELINE ?= 8868303
throughput: $(STAMP)
	$(BIN)/python bench/throughput.py --baseline $(BASELINE) --rounds 3 --repeat 3

# Latency and events/s with the store at its raw-sample limit (retention running throughout), beside an earlier build
retention: $(STAMP)
	$(BIN)/python bench/retention.py --baseline $(BASELINE) --rounds 3

# The quality protocol (docs/RESULTS.md): 5 seeds of paper, semi-supervised, simulated and UCR runs, two at a time
headtohead: $(STAMP)
	mkdir -p out
	$(BIN)/python bench/headtohead.py --jobs 2 --json out/headtohead.json

# What methods given more than Wingbeat (K, true labels, perfect starts) reach on the paper data: the targets' scale
ceiling: $(STAMP)
	$(BIN)/python bench/ceiling.py

# Counting species on simulated deployments (seeds no choice looked at): daily and overall Hill numbers against the
# truth, the daemon's first model, its full retrain and a user's training beside PCA+GMM baselines; latents cached in out/
diversity: $(STAMP)
	mkdir -p out
	$(BIN)/python bench/diversity.py --json out/diversity.jsonl

clean:
	rm -rf $(VENV) out

# The systemd service (docs/operations.md), as root: PREFIX, DESTDIR, TORCH_SPEC, … are read from the environment.
install:
	deploy/install.sh

uninstall:  # make uninstall PURGE=1 also deletes the state, the config and the user
	deploy/uninstall.sh $(if $(PURGE),--purge)
