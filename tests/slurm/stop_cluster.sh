#!/usr/bin/env bash
# Stop the one-node test cluster started by start_cluster.sh. Idempotent.
#
#   tests/slurm/stop_cluster.sh            # stop slurmd, slurmctld, munged
#   tests/slurm/stop_cluster.sh --purge    # ... and delete job/node state + logs
#                                          #     (job ids restart at 1 next time)
#   tests/slurm/stop_cluster.sh --keep-munge   # leave munged running
#
# Only the daemons recorded in the pid files written by start_cluster.sh are signalled.
set -u
BASE="${SLURM_TEST_BASE:-/var/spool/slurm-test}"
purge=0; keep_munge=0
for a in "$@"; do
    case "$a" in
        --purge) purge=1 ;;
        --keep-munge) keep_munge=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "stop_cluster: unknown argument $a" >&2; exit 2 ;;
    esac
done
say() { echo "[stop_cluster] $*"; }

stop_pidfile() { # name pidfile
    local name="$1" pf="$2" pid
    [ -s "$pf" ] || { say "$name: not running (no pid file)"; return 0; }
    pid=$(cat "$pf" 2>/dev/null)
    if ! kill -0 "$pid" 2>/dev/null; then
        say "$name: not running (stale pid $pid)"; rm -f "$pf"; return 0
    fi
    say "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name: still alive after 10s, sending KILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.5
    fi
    rm -f "$pf"
}

stop_pidfile slurmd "$BASE/slurmd.pid"
stop_pidfile slurmctld "$BASE/slurmctld.pid"
[ "$keep_munge" = 1 ] || stop_pidfile munged /run/munge/munged.pid

if [ "$purge" = 1 ]; then
    say "purging $BASE (state, logs)"
    rm -rf "${BASE:?}/ctld" "${BASE:?}/d" "${BASE:?}/log"
fi
exit 0
