#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on this host (Debian's slurm-wlm + munge):
# munged, slurmctld and slurmd, no systemd, no cgroups, no accounting, one default partition.
# Idempotent: when the cluster is already up with this configuration it exits 0 at once.
#
#   bash .ci/slurm_up.sh            # needs root (apt-get, /etc/munge, /etc/slurm)
#
# Environment knobs (all optional):
#   SLURM_UP_DIR   state/spool/log root            (default /tmp/coupled_net_slurm)
#   SLURM_UP_WAIT  seconds to wait for the node    (default 60)
set -euo pipefail

BASE=${SLURM_UP_DIR:-/tmp/coupled_net_slurm}
WAIT=${SLURM_UP_WAIT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
HOST=$(hostname -s)
PART=debug
START=$(date +%s)

log() { echo "slurm_up: $*" >&2; }
die() {
    log "ERROR: $*"
    for f in "$BASE"/log/slurmctld.log "$BASE"/log/slurmd.log /var/log/munge/munged.log; do
        [ -f "$f" ] && { echo "----- tail $f" >&2; tail -n 30 "$f" >&2; }
    done
    exit 1
}

# alive = the pid file's process exists and is not a zombie (PID 1 here may not reap orphans)
pid_alive() {
    local p; [ -f "$1" ] && p=$(cat "$1") && [ -n "$p" ] && [ -r "/proc/$p/stat" ] \
        && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]
}

[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"

# --------------------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the packages' postinst must not try to start daemons (no init system here)
    prc=/usr/sbin/policy-rc.d; made_prc=0
    if [ ! -e $prc ]; then printf '#!/bin/sh\nexit 101\n' >$prc; chmod +x $prc; made_prc=1; fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || {
        [ $made_prc = 1 ] && rm -f $prc; die "apt-get install slurm-wlm munge failed"; }
    [ $made_prc = 1 ] && rm -f $prc
fi

# --------------------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
# what Debian's postinst does: munge:munge, 0400 (munged refuses group/other-readable keys)
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if ! munge_ok; then
    # a stale pid/socket from a dead munged makes a new one refuse to start
    if [ -f /run/munge/munged.pid ] && ! pid_alive /run/munge/munged.pid; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged does not answer (munge -n | unmunge)"
fi

# --------------------------------------------------------------------------- slurm.conf
# Hardware as slurmd sees it (a mismatch with slurm.conf drains the node).
hw=$(slurmd -C 2>/dev/null | head -n1)
hwval() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
CPUS=$(hwval CPUs); CPUS=${CPUS:-$(nproc)}
SOCKETS=$(hwval SocketsPerBoard); SOCKETS=${SOCKETS:-1}
CORES=$(hwval CoresPerSocket); CORES=${CORES:-$CPUS}
THREADS=$(hwval ThreadsPerCore); THREADS=${THREADS:-1}
[ $((SOCKETS * CORES * THREADS)) -eq "$CPUS" ] || { SOCKETS=1; CORES=$CPUS; THREADS=1; }
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
# leave 5% (at least 512 MiB) for the OS and the daemons
RESERVE=$(( MEM_TOTAL / 20 > 512 ? MEM_TOTAL / 20 : 512 ))
REALMEM=$(( MEM_TOTAL - RESERVE )); [ "$REALMEM" -gt 256 ] || REALMEM=$MEM_TOTAL
# a job without --mem would otherwise get the whole node's memory and block every other job
DEFMEM=$(( REALMEM / CPUS ))

new_conf=$(cat <<EOF
# Written by coupled_net/.ci/slurm_up.sh -- single-node test cluster. Do not edit by hand.
ClusterName=coupled_net
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups: plain /proc process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# no accounting: sacct fails (submitit warns and goes on)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# start submitted batch jobs at once (default batch_sched_delay=3 s)
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
# quick turnaround for tests
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=5
KillWait=2
Waittime=0
ReturnToService=2
# small, so that a sweep of ten runs exceeds it and the tests exercise the launcher's chunked arrays
# (array task indices stay below MaxArraySize: 8 tasks, 0-7, per array)
MaxArraySize=8
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$REALMEM State=UNKNOWN
PartitionName=$PART Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

mkdir -p "$BASE"/{state,spool/slurmd,log,run} "$CONF_DIR"
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    [ -f "$CONF" ] && ! grep -q 'coupled_net/.ci/slurm_up.sh' "$CONF" && cp "$CONF" "$CONF.orig.$(date +%s)"
    printf '%s\n' "$new_conf" >"$CONF"
    conf_changed=1
fi

# --------------------------------------------------------------------------- daemons
ctld_pid=$BASE/run/slurmctld.pid
slurmd_pid=$BASE/run/slurmd.pid

# %T as sinfo prints it; a trailing '*' means "not responding" and is kept (it is not usable)
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 | tr -d ' ' ; }
usable() { case "$1" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }
# seconds since the epoch at which the running slurmd registered with slurmctld (0: unknown)
slurmd_registered_at() {
    local t; t=$(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    date -d "$t" +%s 2>/dev/null || echo 0
}

# Fast path: already up with this very configuration.
if [ $conf_changed = 0 ] && pid_alive "$ctld_pid" && pid_alive "$slurmd_pid" \
   && scontrol ping 2>/dev/null | grep -q 'is UP' && usable "$(node_state)"; then
    log "already up ($(( $(date +%s) - START )) s)"
    echo "slurm up: node=$HOST partition=$PART cpus=$CPUS mem=${REALMEM}M state=$(node_state)"
    exit 0
fi

stop_pidfile() {  # stop the daemon named by a pid file (ours only), wait for it to go
    local f=$1 p
    pid_alive "$f" || return 0
    p=$(cat "$f"); kill "$p" 2>/dev/null || true
    for _ in $(seq 100); do pid_alive "$f" || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
}

if [ $conf_changed = 1 ]; then
    log "slurm.conf (re)written; (re)starting daemons"
    stop_pidfile "$slurmd_pid"; stop_pidfile "$ctld_pid"
fi

if ! pid_alive "$ctld_pid"; then
    log "starting slurmctld"
    # -i: ignore (rather than die on) unreadable state files left by an older run
    slurmctld -i || die "slurmctld failed to start"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer scontrol ping"

slurmd_started=0
if ! pid_alive "$slurmd_pid"; then
    log "starting slurmd"
    slurmd_started=$(date +%s)
    slurmd || die "slurmd failed to start"
fi

# --------------------------------------------------------------------------- wait for the node
state=""; resumed=0
deadline=$(( $(date +%s) + WAIT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    state=$(node_state)
    # after a restart slurmctld reports the node's saved state at once: wait for the new slurmd
    if usable "$state" && [ "$(slurmd_registered_at)" -ge $(( slurmd_started - 1 )) ]; then break; fi
    case "${state%[*~#!%\$@^-]}" in
        down|drained|draining|drain|fail|failing)
            if [ $resumed -lt 3 ]; then
                log "node $HOST is $state ($(sinfo -h -N -n "$HOST" -o %E 2>/dev/null)); resuming"
                scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
                resumed=$((resumed + 1))
            fi ;;
    esac
    sleep 0.5
done
usable "$state" && [ "$(slurmd_registered_at)" -ge $(( slurmd_started - 1 )) ] || die "node $HOST not usable after ${WAIT}s (state: '${state:-none}')"

log "up in $(( $(date +%s) - START )) s"
echo "slurm up: node=$HOST partition=$PART cpus=$CPUS mem=${REALMEM}M state=$state"
