#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for slimtrain's launch tests and for trying
# `slimtrain launch slurm` without a cluster.
#
#   bash slurm/local-cluster.sh up       install munge + slurm-wlm if missing, write the config, start
#   bash slurm/local-cluster.sh down     stop the daemons (state is kept; `up` starts clean anyway)
#   bash slurm/local-cluster.sh status   daemons, nodes, queue
#
# Two nodes (slimtrain-n1, slimtrain-n2), both 127.0.0.1: one slurmctld and one `slurmd -N <node>`
# per node, each slurmd on its own port. Everything (config, state, logs, a private munged) lives in
# $SLIMTRAIN_LOCAL_CLUSTER_DIR (default /tmp/slimtrain-slurm), so a machine's own munge/slurm, if any,
# is left alone. Clients find the config through /etc/slurm/slurm.conf, a link written only if that
# path is free or already ours. Needs root (apt, daemons that run jobs as root, /etc/hosts).
# Idempotent; every wait is bounded.
set -euo pipefail

STATE=${SLIMTRAIN_LOCAL_CLUSTER_DIR:-/tmp/slimtrain-slurm}
CONF=$STATE/etc/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
NODES=(slimtrain-n1 slimtrain-n2)
CTLD_PORT=16817
FIRST_SLURMD_PORT=16818
# Marks the lines and files this script owns, so `up` may rewrite them and nothing else.
MARK="slimtrain local cluster"

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Polls "$@" every half second for at most $1 seconds; returns its last status.
wait_for() {
    local seconds=$1; shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then return 1; fi
        sleep 0.5
    done
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run as root so that apt-get can install them"
    mkdir -p "$STATE/log"
    local apt_log=$STATE/log/apt.log
    log "installing ${missing[*]} (apt-get; output in $apt_log)"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists of a fresh machine are empty; refresh them only when the install needs it.
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1 ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >>"$apt_log" 2>&1 ||
        die "apt-get could not install ${missing[*]}; see $apt_log"
}

# Both node names must resolve (the first is the rendezvous address of a multi-node job).
map_node_names() {
    local name
    for name in "${NODES[@]}"; do
        getent hosts "$name" >/dev/null && continue
        echo "127.0.0.1 ${NODES[*]} # $MARK" >>/etc/hosts
        return
    done
}

unmap_node_names() {
    # /etc/hosts may be a bind mount (containers): rewrite it in place rather than replace it.
    if grep -q "# $MARK" /etc/hosts 2>/dev/null; then
        local kept
        kept=$(grep -v "# $MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

write_config() {
    mkdir -p "$STATE"/{etc,ctld,spool,log,run,munge}
    local host cpus mem
    host=$(hostname -s 2>/dev/null || uname -n)
    cpus=$(nproc)
    # slurmd refuses a node whose configured memory exceeds what it finds; ask for a little.
    mem=1024
    local new=$CONF.new
    cat >"$new" <<EOF
# $MARK: written by slurm/local-cluster.sh, rewritten on every \`up\`.
ClusterName=slimtrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire is also how long a requeued job waits before it may start again
# (120 s by default), kept short so the preemption test does not idle.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups (containers and CI machines often lack a writable cgroup tree): processes are tracked
# through their parent links and tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at the queue every few seconds (default: 60 s), so a requeued job restarts promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that was down comes back by itself once its slurmd registers.
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job ends or is requeued.
KillWait=10
SlurmdParameters=config_overrides
# No mail on this machine; slurmctld warns about a missing mail program otherwise.
MailProg=/bin/true
EOF
    local i port=$FIRST_SLURMD_PORT
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$new"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4" >>"$new"
    if cmp -s "$new" "$CONF"; then
        rm -f "$new"
    else
        # Daemons started from an older config would keep it: restart them with this one.
        stop_slurm
        mv "$new" "$CONF"
    fi

    mkdir -p "$(dirname "$SYSTEM_CONF")"
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]] && ! grep -q "$MARK" "$SYSTEM_CONF" 2>/dev/null; then
        die "$SYSTEM_CONF exists and is not ours; move it away or export SLURM_CONF=$CONF yourself"
    fi
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

start_munge() {
    if [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
        return 0
    fi
    local key=$STATE/munge/munge.key
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chmod 700 "$STATE/munge"
    chmod 400 "$key"
    # --force: munged would otherwise refuse a socket left behind by a daemon that did not stop cleanly.
    munged --force --key-file="$key" --socket="$MUNGE_SOCKET" --pid-file="$STATE/run/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for 20 bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" ||
        die "munged did not answer within 20 s; see $STATE/log/munged.log"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_slurm() {
    if ! pid_alive "$STATE/run/slurmctld.pid"; then
        # -c: start from a clean state, so jobs of an earlier session are not resurrected.
        slurmctld -c -f "$CONF"
    fi
    wait_for 30 scontrol ping ||
        die "slurmctld did not answer within 30 s; see $STATE/log/slurmctld.log"
    local node
    for node in "${NODES[@]}"; do
        pid_alive "$STATE/run/slurmd-$node.pid" && continue
        mkdir -p "$STATE/spool/$node"
        slurmd -f "$CONF" -N "$node"
    done
    # A node is usable once it is idle (or already running something).
    local want=${#NODES[@]}
    if ! wait_for 60 bash -c "[[ \$(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l) -ge $want ]]"; then
        sinfo -N -l >&2 || true
        die "nodes not up within 60 s; see $STATE/log/slurmd-*.log"
    fi
}

stop_pidfile() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop_slurm() {
    local node
    for node in "${NODES[@]}"; do stop_pidfile "$STATE/run/slurmd-$node.pid"; done
    stop_pidfile "$STATE/run/slurmctld.pid"
}

cmd_up() {
    install_packages
    map_node_names
    write_config
    start_munge
    start_slurm
    log "up: $(sinfo -h -o '%P %D nodes %t' | tr '\n' ' ')(config $CONF)"
}

cmd_down() {
    # Cancel jobs first so slurmd does not leave orphaned job steps behind.
    if pid_alive "$STATE/run/slurmctld.pid"; then
        scancel --full --quiet --state=RUNNING 2>/dev/null || true
        scancel --quiet --state=PENDING 2>/dev/null || true
    fi
    stop_slurm
    stop_pidfile "$STATE/run/munged.pid"
    if [[ -L $SYSTEM_CONF ]] && [[ $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then rm -f "$SYSTEM_CONF"; fi
    unmap_node_names
    log "down"
}

cmd_status() {
    local name running=0
    for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        if pid_alive "$STATE/run/$name.pid"; then
            echo "$name: running (pid $(cat "$STATE/run/$name.pid"))"
            running=$((running + 1))
        else
            echo "$name: stopped"
        fi
    done
    if pid_alive "$STATE/run/slurmctld.pid"; then
        sinfo -N -l
        squeue
    fi
    # Exit status: 0 only when every daemon runs, so scripts can test `status`.
    ((running == 2 + ${#NODES[@]}))
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
