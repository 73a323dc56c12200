#!/usr/bin/env bash
# Start a one-node Son of Grid Engine (Debian 12, 8.1.9) cluster on this host.
#
# Idempotent: installs the Debian packages if missing, (re)configures a cell
# with this host as master + submit + exec host, a queue (all.q) and a PE
# (smp), starts sge_qmaster and sge_execd if they are not already running,
# and waits until `qstat -f` shows the queue usable.
#
# Must run as root.  Environment knobs:
#   SGE_LAB      lab dir for pid files, env file, logs   (default /tmp/sge-lab)
#   SGE_SLOTS    slots of all.q                         (default 4)
#   SGE_NOTIFY   queue "notify" time: delay between the -notify warning
#                signal (SIGUSR2 before kill, SIGUSR1 before suspend) and the
#                real signal                              (default 00:00:05)
#   SGE_WAIT     seconds to wait for the queue to come up  (default 90)
#
# Output: the last lines on stdout are `export ...` lines a client needs
# (also written to $SGE_LAB/env.sh), so `eval "$(start-sge.sh | grep ^export)"`
# works.  Pids: $SGE_LAB/qmaster.pid, $SGE_LAB/execd.pid.
set -euo pipefail

SGE_LAB=${SGE_LAB:-/tmp/sge-lab}
SGE_SLOTS=${SGE_SLOTS:-4}
SGE_NOTIFY=${SGE_NOTIFY:-00:00:05}
SGE_WAIT=${SGE_WAIT:-90}
export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:${PATH}
UTIL=/usr/lib/gridengine
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOLDB=/var/spool/gridengine/spooldb
QM_SPOOL=/var/spool/gridengine/qmaster
EXECD_SPOOL=/var/spool/gridengine/execd

log() { echo "[start-sge $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$SGE_LAB"
exec 9>"$SGE_LAB/.lock"
flock 9

# ---------------------------------------------------------------- install --
PKGS="gridengine-common gridengine-client gridengine-master gridengine-exec"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing:$missing"
    debconf-set-selections <<'EOF'
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridenginemaster string localhost
EOF
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when the package is unknown to the local lists
    apt-cache show gridengine-master >/dev/null 2>&1 || apt-get update -q >"$SGE_LAB/apt.log" 2>&1
    # Daemons are started below by this script, never by the maintainer
    # scripts: a temporary policy-rc.d forbids invoke-rc.d starts.
    created_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    rc=0
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        $PKGS >>"$SGE_LAB/apt.log" 2>&1 || rc=$?
    [ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || { tail -20 "$SGE_LAB/apt.log" >&2; die "apt-get install failed (log: $SGE_LAB/apt.log)"; }
fi

# ------------------------------------------------------------ cell / spool --
id sgeadmin >/dev/null 2>&1 || die "user sgeadmin missing (gridengine-common postinst failed?)"
for d in "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$COMMON" "$SPOOLDB" "$QM_SPOOL" "$QM_SPOOL/job_scripts" "$EXECD_SPOOL"; do
    mkdir -p "$d"; chown sgeadmin:sgeadmin "$d"
done
if [ ! -e "$COMMON/bootstrap" ]; then
    install -m0644 -o sgeadmin -g sgeadmin /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
fi
if [ ! -e "$SPOOLDB/sge" ]; then
    # packages were installed without shared/gridengineconfig=true
    log "initializing cluster spool"
    su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $SPOOLDB sgeadmin" sgeadmin >>"$SGE_LAB/init.log" 2>&1 \
        || { cat "$SGE_LAB/init.log" >&2; die "init_cluster failed"; }
fi

# ---------------------------------------------------------- host naming ----
# SGE's commlib insists that the name a client claims (its gethostname(),
# resolved) equals the name its peer IP reverse-resolves to.  On containers
# /etc/hosts typically maps 127.0.0.1 to "localhost" first and the hostname
# second, so "vm" connects from 127.0.0.1 == "localhost" and is refused
# ("access denied (client IP resolved to host name "localhost". This is not
# identical to clients host name "vm")").  Fix: SGE host_aliases.
H=$(hostname)
if ! getent hosts "$H" >/dev/null 2>&1; then
    log "hostname $H does not resolve; adding it to /etc/hosts as 127.0.0.1"
    echo "127.0.0.1 $H" >>/etc/hosts
fi
ME=$($UTIL/gethostname -name 2>/dev/null || true)
[ -n "$ME" ] || ME=$H
aliases=""
for addr in $(getent ahostsv4 "$ME" | awk '{print $1}' | sort -u); do
    r=$(getent hosts "$addr" | awk '{print $2}' | head -1)
    [ -n "$r" ] && [ "$r" != "$ME" ] && case " $aliases " in *" $r "*) ;; *) aliases="$aliases $r";; esac
done
want_aliases=""
[ -n "$aliases" ] && want_aliases="$ME$aliases"
cur_aliases=$(cat "$COMMON/host_aliases" 2>/dev/null || true)
if [ "$want_aliases" != "$cur_aliases" ]; then
    if [ -n "$want_aliases" ]; then echo "$want_aliases" >"$COMMON/host_aliases"; else rm -f "$COMMON/host_aliases"; fi
    ALIASES_CHANGED=1
fi
if [ "$(cat "$COMMON/act_qmaster" 2>/dev/null)" != "$ME" ]; then
    echo "$ME" >"$COMMON/act_qmaster"
    ALIASES_CHANGED=1
fi
chown sgeadmin:sgeadmin "$COMMON"/* 2>/dev/null || true

# --------------------------------------------------------------- helpers ---
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# Daemons start with a clean environment: jobs inherit sge_execd's
# environment (not the submitter's, unless qsub -V / -v), so whatever the
# caller of this script has exported (CUDA_VISIBLE_DEVICES, PIP_*, ...) would
# otherwise leak into every job.
daemon() { env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
               SGE_ROOT="$SGE_ROOT" SGE_CELL="$SGE_CELL" "$@"; }
readpid() { cat "$1" 2>/dev/null || true; }
qmaster_ok() { qstat -f >/dev/null 2>&1 && qconf -sh >/dev/null 2>&1; }
stop_pid() {  # pid
    local p=$1 i
    alive "$p" || return 0
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 60); do alive "$p" || return 0; sleep 0.5; done
    kill -KILL "$p" 2>/dev/null || true
}

# --------------------------------------------------------------- qmaster ---
is_qmaster() { alive "${1:-}" && [ "$(cat /proc/$1/comm 2>/dev/null)" = sge_qmaster ]; }
QPID=$(readpid "$SGE_LAB/qmaster.pid")
is_qmaster "$QPID" || QPID=$(readpid "$QM_SPOOL/qmaster.pid")
is_qmaster "$QPID" || QPID=""
if alive "$QPID" && [ -n "${ALIASES_CHANGED:-}" ]; then
    log "host naming changed; restarting qmaster $QPID"
    stop_pid "$QPID"; QPID=""
fi
if ! alive "$QPID"; then
    log "starting sge_qmaster"
    rm -f "$QM_SPOOL/qmaster.pid"
    daemon /usr/sbin/sge_qmaster >>"$SGE_LAB/qmaster.out" 2>&1 || { tail "$QM_SPOOL/messages" >&2 || true; die "sge_qmaster failed"; }
    for i in $(seq 40); do [ -s "$QM_SPOOL/qmaster.pid" ] && break; sleep 0.25; done
    QPID=$(readpid "$QM_SPOOL/qmaster.pid")
fi
alive "$QPID" || { tail "$QM_SPOOL/messages" >&2 || true; die "sge_qmaster not running"; }
echo "$QPID" >"$SGE_LAB/qmaster.pid"
for i in $(seq 120); do qmaster_ok && break; sleep 0.25; done
qmaster_ok || { qstat -f >&2 || true; tail "$QM_SPOOL/messages" >&2 || true; die "qmaster does not answer"; }

# ---------------------------------------------------------- configuration --
TMPD=$(mktemp -d); trap 'rm -rf "$TMPD"' EXIT
# global config: allow root jobs (min_uid/min_gid 0), faster load reports
cat >"$TMPD/editconf" <<'EOF2'
#!/bin/sh
sed -i -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
       -e 's/^load_report_time .*/load_report_time 00:00:05/' \
       -e 's/^max_unheard .*/max_unheard 00:01:00/' "$1"
EOF2
chmod +x "$TMPD/editconf"
EDITOR="$TMPD/editconf" qconf -mconf >/dev/null 2>&1 || die "qconf -mconf failed"
# scheduler: schedule every second, on submit and on finish
qconf -ssconf >"$TMPD/sconf"
sed -i -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
       -e 's/^flush_submit_sec .*/flush_submit_sec 1/' \
       -e 's/^flush_finish_sec .*/flush_finish_sec 1/' "$TMPD/sconf"
qconf -Msconf "$TMPD/sconf" >/dev/null 2>&1 || die "qconf -Msconf failed"
# admin + submit host
qconf -sh 2>/dev/null | grep -qx "$ME" || qconf -ah "$ME" >/dev/null
qconf -ss 2>/dev/null | grep -qx "$ME" || qconf -as "$ME" >/dev/null
# exec host
if ! qconf -sel 2>/dev/null | grep -qx "$ME"; then
    cat >"$TMPD/eh" <<EOF
hostname              $ME
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
    qconf -Ae "$TMPD/eh" >/dev/null || die "qconf -Ae failed"
fi
# parallel environment smp
cat >"$TMPD/smp" <<EOF
pe_name            smp
slots              999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
if qconf -spl 2>/dev/null | grep -qx smp; then qconf -Mp "$TMPD/smp" >/dev/null; else qconf -Ap "$TMPD/smp" >/dev/null; fi
# queue all.q
cat >"$TMPD/all.q" <<EOF
qname                 all.q
hostlist              $ME
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               smp
rerun                 FALSE
slots                 $SGE_SLOTS
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      unix_behavior
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                $SGE_NOTIFY
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
if qconf -sql 2>/dev/null | grep -qx all.q; then
    qconf -Mq "$TMPD/all.q" >/dev/null || die "qconf -Mq failed"
else
    qconf -Aq "$TMPD/all.q" >/dev/null || die "qconf -Aq failed"
fi

# ----------------------------------------------------------------- execd ---
# execd spools in $EXECD_SPOOL/<name it resolves for itself>/ -- with the
# 127.0.0.1-is-localhost /etc/hosts that is ".../localhost/", not ".../$ME/".
execd_pidfile_pid() {
    local f p
    for f in "$EXECD_SPOOL"/*/execd.pid; do
        p=$(readpid "$f"); alive "$p" && [ "$(cat /proc/$p/comm 2>/dev/null)" = sge_execd ] && { echo "$p"; return 0; }
    done
    return 0
}
EPID=$(readpid "$SGE_LAB/execd.pid")
alive "$EPID" && [ "$(cat /proc/$EPID/comm 2>/dev/null)" = sge_execd ] || EPID=$(execd_pidfile_pid)
if ! alive "$EPID"; then
    log "starting sge_execd"
    rm -f "$EXECD_SPOOL"/*/execd.pid
    daemon /usr/sbin/sge_execd >>"$SGE_LAB/execd.out" 2>&1 || die "sge_execd failed"
    for i in $(seq 40); do EPID=$(execd_pidfile_pid); [ -n "$EPID" ] && break; sleep 0.25; done
fi
alive "$EPID" || { tail "$EXECD_SPOOL"/*/messages >&2 || true; die "sge_execd not running"; }
echo "$EPID" >"$SGE_LAB/execd.pid"

# ------------------------------------------------------------ wait usable --
# Queue instance line: "all.q@vm   BIP   0/0/4   0.01   lx-amd64   [states]"
# usable == a load value is reported (not -NA-) and no state column.
ok=""
for i in $(seq $((SGE_WAIT * 4))); do
    line=$(qstat -f -q all.q 2>/dev/null | grep "^all.q@" || true)
    if [ -n "$line" ] && [ "$(echo "$line" | awk '{print NF}')" = 5 ] && ! echo "$line" | grep -q -- '-NA-'; then
        ok=1; break
    fi
    # an "E"rror or "d"isabled state left from an earlier run: clear it
    case "$(echo "$line" | awk '{print $6}')" in *E*) qmod -c "all.q@$ME" >/dev/null 2>&1 || true;; esac
    case "$(echo "$line" | awk '{print $6}')" in *d*) qmod -e "all.q@$ME" >/dev/null 2>&1 || true;; esac
    sleep 0.25
done
[ -n "$ok" ] || { qstat -f >&2 || true; die "queue all.q@$ME did not become usable in ${SGE_WAIT}s"; }
log "queue usable: $line"

cat >"$SGE_LAB/env.sh" <<EOF
export SGE_ROOT=$SGE_ROOT
export SGE_CELL=$SGE_CELL
export PATH=/usr/bin:\$PATH
EOF
cat "$SGE_LAB/env.sh"
