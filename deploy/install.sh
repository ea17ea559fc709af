#!/bin/sh
# Install (or upgrade) Wingbeat as the systemd service `wingbeat` (docs/operations.md). As root, from the source
# tree:   deploy/install.sh        (or: make install)
#
# What it does, in order: the `wingbeat` system user and group; a venv in $PREFIX/venv with torch ($TORCH_SPEC)
# and this project; /etc/wingbeat/wingbeat.toml from `wingbeat check-config`'s defaults, only when there is none
# (an existing config is never touched); the unit in /etc/systemd/system; `systemctl daemon-reload`, enable and
# (re)start, when systemd runs. Running it again upgrades: the venv is kept, the project and unit are replaced,
# the service restarted.
#
# Environment (all optional):
#   PREFIX=/opt/wingbeat      the venv goes to $PREFIX/venv, this guide to $PREFIX/doc
#   DESTDIR=                  write everything under this root instead of / (a test, or to look at the result);
#                             implies WINGBEAT_NO_USER=1 and WINGBEAT_NO_SYSTEMCTL=1. A venv does not move: one
#                             made under DESTDIR runs from there only.
#   PYTHON=python3            the interpreter the venv is made from (3.11 or newer), one the wingbeat user can
#                             run (not under /root: pyenv, conda as root); e.g. PYTHON=/usr/bin/python3
#   TORCH_SPEC=torch==2.13.0  what pip installs for torch before the project; a GPU box names its CUDA build,
#                             e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128";
#                             empty = whatever the project's range resolves to
#   VENV_OPTS=                more `python -m venv` options, e.g. --system-site-packages to use a torch that
#                             PYTHON already has (then TORCH_SPEC=)
#   WINGBEAT_NO_USER=1        do not create the user (config files then stay root-owned)
#   WINGBEAT_NO_SYSTEMCTL=1   do not call systemctl (it is skipped anyway when systemd is not running)
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/wingbeat}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
VENV_OPTS=${VENV_OPTS:-}
NO_USER=${WINGBEAT_NO_USER:-}
NO_SYSTEMCTL=${WINGBEAT_NO_SYSTEMCTL:-}
if [ -n "$DESTDIR" ]; then
    NO_USER=1
    NO_SYSTEMCTL=1
fi
VENV=$DESTDIR$PREFIX/venv
CONF_DIR=$DESTDIR/etc/wingbeat
UNIT_DIR=$DESTDIR/etc/systemd/system

say() { printf 'wingbeat install: %s\n' "$*"; }
die() { printf 'wingbeat install: error: %s\n' "$*" >&2; exit 1; }

[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/systemd/wingbeat.service" ] || die "$SRC is not the Wingbeat source tree"
case $PREFIX in /*) ;; *) die "PREFIX must be an absolute path, got '$PREFIX'" ;; esac
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or set DESTDIR to install under another root)"
fi

# ---- user ---------------------------------------------------------------------------------------------------
if [ -z "$NO_USER" ]; then
    getent group wingbeat >/dev/null || groupadd --system wingbeat
    if ! getent passwd wingbeat >/dev/null; then
        useradd --system --gid wingbeat --home-dir /var/lib/wingbeat --no-create-home \
            --shell /usr/sbin/nologin --comment "Wingbeat daemon" wingbeat
        say "created system user wingbeat"
    fi
fi

# ---- venv and project ---------------------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    say "upgrading the venv in $VENV"
else
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "PYTHON=$PYTHON is not Python 3.11 or newer"
    mkdir -p "$(dirname "$VENV")"
    # shellcheck disable=SC2086  # VENV_OPTS is a list of options
    "$PYTHON" -m venv $VENV_OPTS "$VENV"
    say "created the venv $VENV"
fi
# The service runs the venv as wingbeat: an interpreter under root's home (pyenv, conda as root) cannot be run.
if [ -z "$NO_USER" ] && command -v runuser >/dev/null; then
    runuser -u wingbeat -- "$VENV/bin/python" -c '' 2>/dev/null ||
        die "the wingbeat user cannot run $VENV/bin/python (-> $(readlink -f "$VENV/bin/python")); remove $VENV and make it from an interpreter it can run, e.g. PYTHON=/usr/bin/python3"
fi
if [ -n "$TORCH_SPEC" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url …)
    "$VENV/bin/python" -m pip install -q $TORCH_SPEC
fi
# Built from a copy: pip builds in the tree it is given (build/, *.egg-info), and the source may be read-only.
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./out --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./wingbeat-state -cf - . | tar -C "$BUILD" -xf -
# A local tree is always rebuilt and reinstalled, also under the same version number; dependencies are only
# upgraded where the project's ranges ask for it.
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy only-if-needed "$BUILD"
mkdir -p "$DESTDIR$PREFIX/doc"
cp "$SRC/docs/operations.md" "$DESTDIR$PREFIX/doc/operations.md"
cp "$SRC/docs/files.md" "$DESTDIR$PREFIX/doc/files.md"
say "installed wingbeat $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("wingbeat"))') into $VENV"

# ---- config: written once, never overwritten ----------------------------------------------------------------
mkdir -p "$CONF_DIR"
if [ -e "$CONF_DIR/wingbeat.toml" ]; then
    say "kept the existing $CONF_DIR/wingbeat.toml (check it with: $PREFIX/venv/bin/wingbeat check-config $CONF_DIR/wingbeat.toml)"
else
    tmp=$CONF_DIR/.wingbeat.toml.new
    {
        echo "# Wingbeat daemon configuration: every key and its default (\`wingbeat check-config\`)."
        echo "# The service runs with --state /var/lib/wingbeat, which wins over state_dir below."
        echo "# Apply changes with: systemctl reload wingbeat (keys that need a restart are logged as such)."
        echo
        "$VENV/bin/wingbeat" check-config /dev/null | sed 's|^state_dir = .*|state_dir = "/var/lib/wingbeat"|'
    } >"$tmp"
    chmod 0640 "$tmp"
    mv "$tmp" "$CONF_DIR/wingbeat.toml"
    say "wrote $CONF_DIR/wingbeat.toml (defaults: ingest and publish on loopback, /metrics on 127.0.0.1:9464)"
fi
if [ -z "$NO_USER" ]; then
    chgrp wingbeat "$CONF_DIR" "$CONF_DIR/wingbeat.toml"  # the service reads its config, it cannot change it
    chmod 0750 "$CONF_DIR"
fi

# ---- unit ---------------------------------------------------------------------------------------------------
mkdir -p "$UNIT_DIR"
sed -e "s|/opt/wingbeat/venv/|$PREFIX/venv/|g" -e "s|/opt/wingbeat/doc/|$PREFIX/doc/|g" \
    "$SRC/systemd/wingbeat.service" >"$UNIT_DIR/.wingbeat.service.new"
chmod 0644 "$UNIT_DIR/.wingbeat.service.new"
mv "$UNIT_DIR/.wingbeat.service.new" "$UNIT_DIR/wingbeat.service"
say "installed $UNIT_DIR/wingbeat.service"
# The file sender's template (docs/files.md): installed, never enabled here; one instance per recorder.
sed -e "s|/opt/wingbeat/venv/|$PREFIX/venv/|g" -e "s|/opt/wingbeat/doc/|$PREFIX/doc/|g" \
    "$SRC/systemd/wingbeat-watch@.service" >"$UNIT_DIR/.wingbeat-watch@.service.new"
chmod 0644 "$UNIT_DIR/.wingbeat-watch@.service.new"
mv "$UNIT_DIR/.wingbeat-watch@.service.new" "$UNIT_DIR/wingbeat-watch@.service"
say "installed $UNIT_DIR/wingbeat-watch@.service (per recorder: systemctl enable --now wingbeat-watch@NAME)"

# ---- systemd ------------------------------------------------------------------------------------------------
if [ -n "$NO_SYSTEMCTL" ]; then
    say "systemctl skipped (WINGBEAT_NO_SYSTEMCTL or DESTDIR set)"
elif [ ! -d /run/systemd/system ]; then
    say "systemd is not running here (a container?): systemctl skipped."
    say "start the daemon by hand: $PREFIX/venv/bin/wingbeat run --config /etc/wingbeat/wingbeat.toml --state /var/lib/wingbeat"
else
    systemctl daemon-reload
    systemctl enable wingbeat.service
    systemctl restart wingbeat.service  # starts it, or runs the upgraded code
    say "wingbeat.service enabled and started: systemctl status wingbeat; journalctl -u wingbeat"
fi
