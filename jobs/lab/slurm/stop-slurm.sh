#!/usr/bin/env bash
# stop-slurm.sh - stop what start-slurm.sh started, by the PIDs in its pidfiles.
#   --purge   also delete saved state (jobs, job ids) and logs (keeps config + munge key)
set -uo pipefail

LAB=${SLURM_LAB:-${TMPDIR:-/tmp}/pervade-slurm}
RUN=$LAB/run MUN=$LAB/munge
export SLURM_CONF=$LAB/etc/slurm.conf

alive() { # pidfile comm -> pid if that process is alive with that name
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && echo "$pid"
}
stop_pid() { # pidfile comm
  local pid i
  if ! pid=$(alive "$1" "$2"); then echo "$2: not running"; rm -f "$1"; return 0; fi
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; echo "$2: pid $pid SIGKILLed"; else echo "$2: pid $pid stopped"; fi
  rm -f "$1"
}

descendants() { # pid -> all descendant pids
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo -n " $c"; descendants "$c"
  done
}

# 1. Cancel jobs first: stopping slurmd does NOT kill running jobs (slurmstepd survives it).
if alive "$RUN/slurmctld.pid" slurmctld >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null
    kw=$(scontrol show config 2>/dev/null | awk '/^KillWait/{print $3}')
    for i in $(seq $(((${kw:-30} + 15) * 10))); do
      [ -z "$(squeue -h -t R,CG,S,CF 2>/dev/null)" ] && break; sleep 0.1
    done
  fi
fi

# 2. Daemons, by pidfile.
stop_pid "$RUN/slurmd.pid" slurmd
stop_pid "$RUN/slurmctld.pid" slurmctld
stop_pid "$MUN/munged.pid" munged

# 3. Stray slurmstepd/job processes of this lab (slurmstepd inherits SLURM_LAB_OWNER from slurmd).
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] || continue
  tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx "SLURM_LAB_OWNER=$LAB" || continue
  tree=$(descendants "$p")
  echo "killing stray slurmstepd pid $p and descendants:$tree"
  kill -KILL "$p" $tree 2>/dev/null
done

if [ "${1:-}" = --purge ]; then
  rm -rf "${LAB:?}/state" "${LAB:?}/log" "$MUN/munged.seed"
  echo "purged $LAB/state and $LAB/log"
fi
echo "stopped."
