#!/bin/sh
# Remove the Wingbeat service installed by deploy/install.sh (docs/operations.md). As root:
#   deploy/uninstall.sh            stop and disable the unit, remove it, the venv and the guide; KEEP the state
#                                  (/var/lib/wingbeat: store, model versions) and the config (/etc/wingbeat)
#   deploy/uninstall.sh --purge    also delete /var/lib/wingbeat, /etc/wingbeat, /var/cache/wingbeat and the user
# PREFIX, DESTDIR, WINGBEAT_NO_USER and WINGBEAT_NO_SYSTEMCTL as for install.sh.
set -eu

PURGE=
for arg in "$@"; do
    case $arg in
    --purge) PURGE=1 ;;
    -h | --help)
        sed -n '2,6p' "$0"
        exit 0
        ;;
    *)
        printf 'wingbeat uninstall: error: unknown argument %s (only --purge)\n' "$arg" >&2
        exit 2
        ;;
    esac
done
PREFIX=${PREFIX:-/opt/wingbeat}
DESTDIR=${DESTDIR:-}
NO_USER=${WINGBEAT_NO_USER:-}
NO_SYSTEMCTL=${WINGBEAT_NO_SYSTEMCTL:-}
if [ -n "$DESTDIR" ]; then
    NO_USER=1
    NO_SYSTEMCTL=1
fi
UNIT=$DESTDIR/etc/systemd/system/wingbeat.service

say() { printf 'wingbeat uninstall: %s\n' "$*"; }

case $PREFIX in /*) ;; *)
    printf 'wingbeat uninstall: error: PREFIX must be an absolute path, got %s\n' "$PREFIX" >&2
    exit 2
    ;;
esac
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    printf 'wingbeat uninstall: error: run as root (or set DESTDIR)\n' >&2
    exit 1
fi

systemd_runs() { [ -z "$NO_SYSTEMCTL" ] && [ -d /run/systemd/system ]; }

if systemd_runs; then
    systemctl disable --now wingbeat.service 2>/dev/null || true  # stops it: SIGTERM drains, exit 0
    say "stopped and disabled wingbeat.service"
fi
if systemd_runs; then  # every file sender (wingbeat-watch@NAME): their journals stay in /var/lib/wingbeat-watch
    systemctl disable --now 'wingbeat-watch@*.service' 2>/dev/null || true
fi
rm -f "$UNIT"
rm -rf "${UNIT}.d"  # drop-ins (`systemctl edit wingbeat`) belong to the unit
WATCH_UNIT=$DESTDIR/etc/systemd/system/wingbeat-watch@.service
rm -f "$WATCH_UNIT"
rm -rf "${WATCH_UNIT}.d"
if systemd_runs; then
    systemctl daemon-reload
    systemctl reset-failed wingbeat.service 2>/dev/null || true
fi
# Only what install.sh made under PREFIX: PREFIX itself may hold other things.
rm -rf "$DESTDIR$PREFIX/venv" "$DESTDIR$PREFIX/doc"
rmdir "$DESTDIR$PREFIX" 2>/dev/null || true
say "removed the unit and $PREFIX/venv"

if [ -n "$PURGE" ]; then
    rm -rf "$DESTDIR/var/lib/wingbeat" "$DESTDIR/etc/wingbeat" "$DESTDIR/var/cache/wingbeat" \
        "$DESTDIR/var/lib/wingbeat-watch"
    if [ -z "$NO_USER" ] && getent passwd wingbeat >/dev/null; then
        userdel wingbeat
        getent group wingbeat >/dev/null && groupdel wingbeat
    fi
    say "purged the state, the config, the cache and the wingbeat user"
else
    say "kept the state $DESTDIR/var/lib/wingbeat and the config $DESTDIR/etc/wingbeat (--purge deletes them)"
fi
