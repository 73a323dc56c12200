#!/usr/bin/env bash
# Stop the one-node SGE cluster started by start-sge.sh: qdel all jobs, wait
# for them to leave, then stop sge_execd, leftover sge_shepherd children and
# sge_qmaster, by pid (pid files in $SGE_LAB, default /tmp/sge-lab).
# Idempotent; safe to run when nothing is running.
set -uo pipefail

SGE_LAB=${SGE_LAB:-/tmp/sge-lab}
export SGE_ROOT=${SGE_ROOT:-/var/lib/gridengine}
export SGE_CELL=${SGE_CELL:-default}
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:${PATH}
QWAIT=${SGE_STOP_WAIT:-20}

log() { echo "[stop-sge $(date +%T)] $*" >&2; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
readpid() { cat "$1" 2>/dev/null || true; }
stop_pid() {  # pid name
    local p=$1 n=$2 i
    alive "$p" || return 0
    log "stopping $n ($p)"
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 60); do alive "$p" || return 0; sleep 0.5; done
    log "$n ($p) still alive after 30s: SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
    for i in $(seq 10); do alive "$p" || return 0; sleep 0.5; done
}

QPID=$(readpid "$SGE_LAB/qmaster.pid")
EPID=$(readpid "$SGE_LAB/execd.pid")

# 1. delete all jobs while qmaster and execd still run
if alive "$QPID" && command -v qdel >/dev/null; then
    if [ -n "$(qstat -u '*' 2>/dev/null)" ]; then
        log "qdel all jobs"
        qdel -f -u '*' >/dev/null 2>&1 || true
        for i in $(seq $((QWAIT * 2))); do
            [ -z "$(qstat -u '*' 2>/dev/null)" ] && break
            sleep 0.5
        done
        [ -z "$(qstat -u '*' 2>/dev/null)" ] || log "jobs still listed after ${QWAIT}s; stopping anyway"
    fi
fi

# 2. execd, and any shepherds (jobs) it left behind
SHEP=""
if alive "$EPID"; then
    SHEP=$(pgrep -P "$EPID" 2>/dev/null | tr '\n' ' ' || true)
fi
stop_pid "$EPID" sge_execd
for s in $SHEP; do
    # a shepherd's children are the job; kill the job's process group first
    for c in $(pgrep -P "$s" 2>/dev/null); do kill -KILL -- "-$c" 2>/dev/null || kill -KILL "$c" 2>/dev/null || true; done
    stop_pid "$s" sge_shepherd
done

# 3. qmaster
stop_pid "$QPID" sge_qmaster

rm -f "$SGE_LAB/qmaster.pid" "$SGE_LAB/execd.pid"
log "stopped"
