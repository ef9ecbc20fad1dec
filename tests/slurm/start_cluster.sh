#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on this (Debian) machine, for tests.
#
#   sudo tests/slurm/start_cluster.sh          # install if needed, configure, start, wait for idle
#   tests/slurm/stop_cluster.sh [--purge]       # stop the daemons (and drop job state)
#
# Idempotent: when the cluster already answers and its node is usable, exits 0 at once.
# On failure the LAST line on stderr is "SLURM-UNAVAILABLE: <reason>" and the exit code
# is non-zero (2: cannot work on this machine, e.g. not root / no apt / install failed;
# 1: daemons did not come up), so a pytest fixture can skip with that reason.
#
# Environment knobs (all optional):
#   SLURM_TEST_BASE      state + logs directory        (default /var/spool/slurm-test)
#   SLURM_START_TIMEOUT  seconds to wait for node idle (default 90)
#   SLURM_TEST_GPUS      number of fake GPUs on node   (default 1)
#   SLURM_TEST_CPUS      declare this many CPUs on the node instead of the real count
#                        (SlurmdParameters=config_overrides; jobs then oversubscribe the
#                        real cores) so rules with threads/cpus_per_gpu > real CPUs can run
#   SLURM_TEST_GPU_TYPE  GRES type of the fake GPUs    (default none: Gres=gpu:N;
#                        with e.g. "fake": Gres=gpu:fake:N, so gpu_model="fake" also works)
#   SLURM_TEST_NO_INSTALL=1  never call apt-get (fail instead)
#
# What it sets up (see README.md next to this file):
#   /etc/slurm/slurm.conf + gres.conf (marked "# managed by mambapeft-repro tests/slurm")
#   partitions: debug (default) and gpu, both on the one node
#   select/cons_tres, CR_Core_Memory, no accounting (no slurmdbd), no cgroups
#   MinJobAge=3600 so `squeue --states=all` still lists finished jobs
#   a fake GPU GRES (gres.conf: Name=gpu File=<fake char devices>) so --gpus=1 / --gres=gpu:1 jobs run
# Changing a knob while the cluster is up restarts slurmctld+slurmd with the new config.
set -u

BASE="${SLURM_TEST_BASE:-/var/spool/slurm-test}"
TIMEOUT="${SLURM_START_TIMEOUT:-90}"
NGPU="${SLURM_TEST_GPUS:-1}"
GPU_TYPE="${SLURM_TEST_GPU_TYPE:-}"   # e.g. "fake" -> Gres=gpu:fake:1 (then gpu_model=fake works too)
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
GRES_CONF="$CONF_DIR/gres.conf"
MARK="# managed by mambapeft-repro tests/slurm"
LOGDIR="$BASE/log"

say() { echo "[start_cluster] $*"; }
unavailable() { # code reason...
    local code="$1"; shift
    echo "SLURM-UNAVAILABLE: $*" >&2
    exit "$code"
}

[ "$(id -u)" = 0 ] || unavailable 2 "must run as root (needs apt-get, /etc/slurm, daemons)"
case "$NGPU" in *[!0-9]*|''|0) unavailable 2 "SLURM_TEST_GPUS must be a positive integer" ;; esac
case "${SLURM_TEST_CPUS:-1}" in *[!0-9]*|''|0) unavailable 2 "SLURM_TEST_CPUS must be a positive integer" ;; esac
case "$GPU_TYPE" in *[!A-Za-z0-9_.]*) unavailable 2 "SLURM_TEST_GPU_TYPE may only contain letters, digits, _ and ." ;; esac

pid_alive() { # pidfile
    [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

node_name() { hostname -s; }

node_state() { # prints e.g. idle, mixed, allocated, down*, drained, unknown*
    timeout 10 sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n1
}

cluster_up() {
    command -v scontrol >/dev/null 2>&1 || return 1
    [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" || return 1
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    pid_alive "$BASE/slurmd.pid" || return 1
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
    esac
    return 1
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KNOBS="cpus=${SLURM_TEST_CPUS:-} gpus=$NGPU type=$GPU_TYPE base=$BASE script=$(cksum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if cluster_up && [ "$(cat "$BASE/knobs" 2>/dev/null)" != "$KNOBS" ]; then
    say "settings changed ($(cat "$BASE/knobs" 2>/dev/null) -> $KNOBS); restarting slurm daemons"
    "$HERE/stop_cluster.sh" --keep-munge >/dev/null
fi
if cluster_up; then
    say "cluster already up (node $(node_name): $(node_state)); logs in $LOGDIR"
    exit 0
fi

T0=$(date +%s)

# ---------------------------------------------------------------- install
need_install=0
for b in munged munge slurmctld slurmd sinfo sbatch squeue scontrol; do
    command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    [ "${SLURM_TEST_NO_INSTALL:-0}" = 1 ] && unavailable 2 "slurm/munge not installed and SLURM_TEST_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || unavailable 2 "slurm-wlm/munge missing and apt-get not available"
    say "installing slurm-wlm + munge with apt-get (log: /tmp/slurm-test-apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    APT_OPTS=(-y -q --no-install-recommends -o Acquire::Retries=2 -o Acquire::http::Timeout=30 -o Dpkg::Use-Pty=0)
    if ! apt-get install "${APT_OPTS[@]}" slurm-wlm munge >/tmp/slurm-test-apt.log 2>&1; then
        say "install failed with current package lists; running apt-get update"
        apt-get update -q -o Acquire::Retries=2 -o Acquire::http::Timeout=30 >>/tmp/slurm-test-apt.log 2>&1 \
            || unavailable 2 "apt-get update failed (no package registry?); see /tmp/slurm-test-apt.log"
        apt-get install "${APT_OPTS[@]}" slurm-wlm munge >>/tmp/slurm-test-apt.log 2>&1 \
            || unavailable 2 "apt-get install slurm-wlm munge failed; see /tmp/slurm-test-apt.log"
    fi
    for b in munged slurmctld slurmd sinfo; do
        command -v "$b" >/dev/null 2>&1 || unavailable 2 "$b still missing after apt-get install"
    done
    say "installed in $(( $(date +%s) - T0 ))s: $(slurmctld -V 2>/dev/null)"
fi

# ---------------------------------------------------------------- munge
id munge >/dev/null 2>&1 || unavailable 2 "user 'munge' missing (broken munge package?)"
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/log/munge; chmod 0711 /var/lib/munge; chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || true
    fi
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    if pid_alive /run/munge/munged.pid; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null; sleep 1; fi
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 \
        || unavailable 1 "munged failed to start; see /var/log/munge/munged.log"
    for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || unavailable 1 "munge credential round trip fails; see /var/log/munge/munged.log"
fi

# ---------------------------------------------------------------- config
NODE=$(node_name)
HW=$(slurmd -C 2>/dev/null | head -n1)   # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
[ -n "$HW" ] || unavailable 1 "'slurmd -C' printed nothing; cannot detect CPUs/memory"
# keep only the hardware fields, drop NodeName=
HW_FIELDS=$(echo "$HW" | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
CPUS=$(echo "$HW" | tr ' ' '\n' | sed -n 's/^CPUs=//p')
MEM=$(echo "$HW" | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
if [ -n "${SLURM_TEST_CPUS:-}" ]; then
    CPUS=$SLURM_TEST_CPUS
    HW_FIELDS="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM"
    OVERRIDES="SlurmdParameters=config_overrides"
else
    OVERRIDES="# SlurmdParameters=config_overrides  (set SLURM_TEST_CPUS to declare more CPUs than real)"
fi
DEFMEM=$(( MEM / (CPUS > 0 ? CPUS : 1) / 4 )); [ "$DEFMEM" -lt 100 ] && DEFMEM=100

GRES_SPEC="gpu:${GPU_TYPE:+$GPU_TYPE:}$NGPU"
# fake GPU "device files": character devices with /dev/null's numbers (1,3), one per GPU,
# so slurmd accepts them and sets CUDA_VISIBLE_DEVICES=0,1,... from the trailing digits
rm -rf "$BASE/fakegpu"; mkdir -p "$BASE/fakegpu"
mk_ok=1
for i in $(seq 0 $(( NGPU - 1 ))); do mknod -m 0666 "$BASE/fakegpu/nvidia$i" c 1 3 2>/dev/null || mk_ok=0; done
if [ "$mk_ok" = 1 ]; then
    if [ "$NGPU" = 1 ]; then GPU_FILES="$BASE/fakegpu/nvidia0"; else GPU_FILES="$BASE/fakegpu/nvidia[0-$(( NGPU - 1 ))]"; fi
elif [ "$NGPU" = 1 ]; then
    GPU_FILES=/dev/null   # mknod not permitted: /dev/null itself works for one GPU
else
    unavailable 2 "mknod not permitted here, so only SLURM_TEST_GPUS=1 (File=/dev/null) can work"
fi
mkdir -p "$CONF_DIR" "$BASE/ctld" "$BASE/d" "$LOGDIR"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    bk="$CONF.bak.$(date +%s)"; cp -a "$CONF" "$bk"; say "existing foreign $CONF backed up to $bk"
fi
if [ -f "$GRES_CONF" ] && ! grep -qF "$MARK" "$GRES_CONF"; then
    bk="$GRES_CONF.bak.$(date +%s)"; cp -a "$GRES_CONF" "$bk"; say "existing foreign $GRES_CONF backed up to $bk"
fi

cat >"$CONF" <<EOF
$MARK
# one-node test cluster; regenerated by start_cluster.sh on every (re)start
ClusterName=snaketest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/d
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups inside this container (gVisor): plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# accounting off: no slurmdbd; sacct/sacctmgr/sshare do not work -> use squeue for status
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
GresTypes=gpu
# keep finished jobs visible to 'squeue --states=all' for an hour (plugin status checks)
MinJobAge=3600
# reject at submit time what can never run here (e.g. --cpus-per-task > CPUs), instead of
# leaving it PENDING (Reason=PartitionConfig) forever while snakemake waits
EnforcePartLimits=ALL
$OVERRIDES
MaxJobCount=100000
ReturnToService=2
SchedulerParameters=sched_interval=5
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 $HW_FIELDS Gres=$GRES_SPEC State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF

cat >"$GRES_CONF" <<EOF
$MARK
# fake GPUs: char devices 1,3 (= /dev/null) as "device files", one per GPU. Count= without
# File= registers 0 GPUs in 22.05 (node goes INVAL: "gres/gpu count reported lower than
# configured (0 < 1)"); regular files are rejected ("not a valid character or block
# device"); Count must equal the number of files.
AutoDetect=off
NodeName=$NODE Name=gpu${GPU_TYPE:+ Type=$GPU_TYPE} File=$GPU_FILES Count=$NGPU
EOF

echo "$KNOBS" >"$BASE/knobs"

# ---------------------------------------------------------------- daemons
if ! pid_alive "$BASE/slurmctld.pid"; then
    say "starting slurmctld"
    rm -f "$BASE/slurmctld.pid"
    slurmctld >>"$LOGDIR/slurmctld.stdout" 2>&1 \
        || unavailable 1 "slurmctld failed to start: $(tail -n1 "$LOGDIR/slurmctld.log" 2>/dev/null)"
else
    say "slurmctld already running; reconfiguring"
    scontrol reconfigure >/dev/null 2>&1 || true
fi
for _ in $(seq 1 40); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.25; done

if ! pid_alive "$BASE/slurmd.pid"; then
    say "starting slurmd"
    rm -f "$BASE/slurmd.pid"
    slurmd >>"$LOGDIR/slurmd.stdout" 2>&1 \
        || unavailable 1 "slurmd failed to start: $(tail -n1 "$LOGDIR/slurmd.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- wait
say "waiting up to ${TIMEOUT}s for node $NODE to be idle"
deadline=$(( $(date +%s) + TIMEOUT )); last=""; resumed=0
while :; do
    st=$(node_state)
    case "$st" in
        idle|mixed|allocated|completing) break ;;
        inval*)
            unavailable 1 "node $NODE rejected by slurmctld: $(sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null | head -n1); logs in $LOGDIR" ;;
        down*|drain*|fail*)
            if [ "$resumed" = 0 ]; then
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1
            fi ;;
    esac
    pid_alive "$BASE/slurmctld.pid" || unavailable 1 "slurmctld died: $(grep -E 'fatal|error' "$LOGDIR/slurmctld.log" 2>/dev/null | tail -n1); logs in $LOGDIR"
    pid_alive "$BASE/slurmd.pid" || unavailable 1 "slurmd died: $(grep -E 'fatal|error' "$LOGDIR/slurmd.log" 2>/dev/null | tail -n1); logs in $LOGDIR"
    [ "$st" != "$last" ] && say "  node state: ${st:-<no answer>} (+$(( $(date +%s) - T0 ))s)" && last="$st"
    if [ "$(date +%s)" -ge "$deadline" ]; then
        reason=$(sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null | head -n1)
        pid_alive "$BASE/slurmctld.pid" || reason="slurmctld died: $(tail -n1 "$LOGDIR/slurmctld.log" 2>/dev/null) $reason"
        pid_alive "$BASE/slurmd.pid" || reason="slurmd died: $(tail -n1 "$LOGDIR/slurmd.log" 2>/dev/null) $reason"
        unavailable 1 "node $NODE not idle after ${TIMEOUT}s (state '${st}'): $reason; logs in $LOGDIR"
    fi
    sleep 0.5
done

say "cluster up in $(( $(date +%s) - T0 ))s: node $NODE $(node_state), CPUs=$CPUS RealMemory=$MEM Gres=$GRES_SPEC, partitions: $(sinfo -h -o '%P' | tr '\n' ' ')"
say "config: $CONF $GRES_CONF; logs: $LOGDIR/slurmctld.log $LOGDIR/slurmd.log /var/log/munge/munged.log"
exit 0
