#!/usr/bin/env bash
# sinkscope's test/dev Slurm: a real single-host cluster from Debian 12 packages (Slurm 22.05),
# started by hand (no systemd), with accounting (MariaDB + slurmdbd) so that `sacct` works.
#
#   scripts/slurm/start_slurm.sh [start|stop|restart|status]
#
# start   idempotent. Installs missing packages (apt), then starts whatever is not running:
#         munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd(s). When slurmctld is not running it
#         COLD-starts: controller state and the accounting database are wiped, so job ids restart at 1
#         and `sacct -j N` can never return an older job N. When the cluster is up but the wanted
#         config differs (e.g. another MaxArraySize), it restarts cold. Waits until all nodes are idle.
# stop    stops the daemons this script started (pid files only), never anything else.
# status  prints daemons, ping, sinfo, MaxArraySize; exit 0 when usable, 3 when not.
#
# Knobs (environment; SINKSCOPE_ prefix so that nothing collides with Slurm's own SLURM_* variables):
#   SINKSCOPE_SLURM_ROOT=${TMPDIR:-/tmp}/sinkscope-slurm   all state, spool, logs, pids, MariaDB data (MariaDB
#                                        runs as user mysql: when it cannot reach ROOT, e.g. inside a 0700
#                                        `mktemp -d`, its data go to /var/lib/sinkscope-slurm/<hash of ROOT>)
#   SINKSCOPE_SLURM_MAX_ARRAY_SIZE=4     MaxArraySize (small on purpose: tests exercise array splitting)
#   SINKSCOPE_SLURM_NCPUS=$(nproc)       CPUs per node (may exceed the real count: config_overrides)
#   SINKSCOPE_SLURM_NNODES=1             >1: fake nodes node[1-N], one slurmd each on this host
#   SINKSCOPE_SLURM_GPUS=0               >0: advertise N fake GPUs per node (GRES without devices) so that
#                                        --gpus-per-task is accepted; no CUDA device is behind them
#   SINKSCOPE_SLURM_DB_PORT=3307         MariaDB TCP port (127.0.0.1 only)
#   SINKSCOPE_SLURM_CONF_DIR=/etc/slurm  where slurm.conf goes (clients read /etc/slurm by default)
set -euo pipefail

ROOT=${SINKSCOPE_SLURM_ROOT:-${TMPDIR:-/tmp}/sinkscope-slurm}
MAX_ARRAY=${SINKSCOPE_SLURM_MAX_ARRAY_SIZE:-4}
NCPUS=${SINKSCOPE_SLURM_NCPUS:-$(nproc)}
NNODES=${SINKSCOPE_SLURM_NNODES:-1}
NGPUS=${SINKSCOPE_SLURM_GPUS:-0}
DB_PORT=${SINKSCOPE_SLURM_DB_PORT:-3307}
CONF_DIR=${SINKSCOPE_SLURM_CONF_DIR:-/etc/slurm}
HOST=$(hostname -s)
RUN=$ROOT/run LOG=$ROOT/log
PKGS="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"

log() { echo "[start_slurm] $*" >&2; }
die() { echo "[start_slurm] ERROR: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # SIGTERM the one pid in $1, wait up to 10 s, then SIGKILL it
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

node_names() {
  if [ "$NNODES" -gt 1 ]; then for i in $(seq "$NNODES"); do echo "node$i"; done; else echo "$HOST"; fi
}

stop_slurm() {  # slurm daemons only (MariaDB and munge keep running: restarts stay fast)
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  stop_pidfile "$RUN/slurmctld.pid"
  stop_pidfile "$RUN/slurmdbd.pid"
}

stop_all() {
  stop_slurm
  if [ -s "$RUN/dbroot" ]; then
    local dbroot; dbroot=$(cat "$RUN/dbroot")
    stop_pidfile "$dbroot/mariadbd.pid"
    case "$dbroot" in  # a database kept outside ROOT (0700 ROOT) is this ROOT's only: remove it with the cluster
      /var/lib/sinkscope-slurm/*) rm -rf "$dbroot" "$dbroot.root" ;;
    esac
    rm -f "$RUN/dbroot"
  fi
  stop_pidfile "$RUN/munged.pid"   # only written when this script started munged
}

idle_nodes() { sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}'; }

status() {
  local ok=0
  for f in "$RUN/munged.pid" "$(cat "$RUN/dbroot" 2>/dev/null || echo "$RUN")/mariadbd.pid" "$RUN/slurmdbd.pid" "$RUN/slurmctld.pid"; do
    d=$(basename "$f" .pid)
    if alive "$f"; then echo "$d: running (pid $(cat "$f"))"; else echo "$d: not running (by this script)"; fi
  done
  for n in $(node_names); do
    if alive "$RUN/slurmd-$n.pid"; then echo "slurmd $n: running"; else echo "slurmd $n: not running"; ok=3; fi
  done
  scontrol ping 2>/dev/null | grep -q UP || ok=3
  sacct -n -X -j 1 >/dev/null 2>&1 || { echo "sacct: NOT working (no accounting)"; ok=3; }
  scontrol show config 2>/dev/null | grep -E '^(MaxArraySize|ClusterName|SLURM_VERSION)' || true
  sinfo 2>/dev/null || true
  echo "state root: $ROOT"
  return $ok
}

case "${1:-start}" in
  stop) stop_all; exit 0 ;;
  status) status; exit $? ;;
  restart) stop_slurm ;;
  start) ;;
  *) die "usage: $0 [start|stop|restart|status]" ;;
esac

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts munged/slurmd as root)"

# ---- 1. packages ---------------------------------------------------------------------------
MISSING=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$MISSING" ]; then
  command -v apt-get >/dev/null || die "packages missing ($MISSING) and no apt-get"
  log "installing: $MISSING"
  apt-get update -qq || die "apt-get update failed"
  # Debian's policy-rc.d keeps maintainer scripts from starting services: this script starts them.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $MISSING >/dev/null \
    || die "apt-get install $MISSING failed"
fi
mkdir -p "$ROOT"/{state,spool,log,run} "$CONF_DIR"
# MariaDB runs as user mysql, which must reach its datadir, socket and pid file through every parent folder
if runuser -u mysql -- test -x "$ROOT" 2>/dev/null; then
  DBROOT=$ROOT/mysql
else  # e.g. ROOT inside a 0700 `mktemp -d`: keep the database where mysql can reach it, one per ROOT
  DBROOT=/var/lib/sinkscope-slurm/$(printf %s "$ROOT" | sha256sum | cut -c1-12)
  mkdir -p /var/lib/sinkscope-slurm
  echo "$ROOT" > /var/lib/sinkscope-slurm/"$(basename "$DBROOT")".root
fi
DB=$DBROOT/data SOCK=$DBROOT/mysqld.sock DBPID=$DBROOT/mariadbd.pid
echo "$DBROOT" > "$RUN/dbroot"

# ---- 2. the wanted config (written to a temp file; compared with the running one) -------------
MEM=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 1024 ))
GRES_LINE="" GRES_TYPES=""
if [ "$NGPUS" -gt 0 ]; then
  GRES_LINE="Gres=gpu:$NGPUS"
  GRES_TYPES="GresTypes=gpu
AccountingStorageTRES=gres/gpu"
fi
if [ "$NNODES" -gt 1 ]; then
  NODELINE="NodeName=node[1-$NNODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-$((17000 + NNODES)) CPUs=$NCPUS RealMemory=$((MEM / NNODES)) $GRES_LINE State=UNKNOWN"
else
  NODELINE="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$MEM $GRES_LINE State=UNKNOWN"
fi
NEW_CONF=$(mktemp)
cat > "$NEW_CONF" <<CONF
# written by sinkscope scripts/slurm/start_slurm.sh; state under $ROOT
ClusterName=sinkscope
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
# no cgroups in containers: plain process tracking, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
$GRES_TYPES
# small on purpose: sweeps with more shards must be split into several arrays
MaxArraySize=$MAX_ARRAY
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
# real preemption: a job in partition "urgent" requeues jobs of "debug"; the user signal
# (submitit's USR2) is sent at preemption time
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
Waittime=0
$NODELINE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=15
PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF

NEW_GRES=$(mktemp)
trap 'rm -f "$NEW_CONF" "$NEW_GRES"' EXIT
if [ "$NGPUS" -gt 0 ]; then
  # Slurm wants one device file per GPU; plain files under ROOT stand in for /dev/nvidiaN
  mkdir -p "$ROOT/fakegpu"
  for n in $(node_names); do
    for g in $(seq 0 $((NGPUS - 1))); do  # a char device like /dev/null (c 1 3); a plain file if mknod is denied
      [ -e "$ROOT/fakegpu/$n-gpu$g" ] || mknod "$ROOT/fakegpu/$n-gpu$g" c 1 3 2>/dev/null || touch "$ROOT/fakegpu/$n-gpu$g"
    done
    echo "NodeName=$n Name=gpu File=$ROOT/fakegpu/$n-gpu[0-$((NGPUS - 1))]" >> "$NEW_GRES"
  done
fi

running_ok() { alive "$RUN/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q UP; }
if running_ok && ! { cmp -s "$NEW_CONF" "$CONF_DIR/slurm.conf" && cmp -s "$NEW_GRES" "$CONF_DIR/gres.conf"; }; then
  log "config changed: restarting Slurm cold"
  stop_slurm
fi
cp "$NEW_CONF" "$CONF_DIR/slurm.conf"
cp "$NEW_GRES" "$CONF_DIR/gres.conf"

# ---- 3. munge ------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not come up"
  cp /run/munge/munged.pid "$RUN/munged.pid"
fi

# ---- 4. MariaDB (own datadir under ROOT, unix socket + 127.0.0.1:DB_PORT) ---------------------
sql() { mariadb --socket="$SOCK" -uroot "$@"; }
if ! alive "$DBPID" || ! sql -e 'select 1' >/dev/null 2>&1; then
  rm -f "$DBPID"
  install -d -o mysql -g mysql -m 0750 "$DBROOT" "$DB"
  if [ ! -d "$DB/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $LOG/mariadb-install.log"
  fi
  setsid -f /usr/sbin/mariadbd --user=mysql --datadir="$DB" --socket="$SOCK" \
    --pid-file="$DBPID" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=64M \
    --log-error="$DBROOT/mariadb.err" </dev/null >/dev/null 2>&1
  for _ in $(seq 150); do sql -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  sql -e 'select 1' >/dev/null 2>&1 || die "MariaDB did not start: $DBROOT/mariadb.err"
fi

cat > "$CONF_DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=sinkscope
StorageLoc=slurm_acct_db
CONF
chmod 600 "$CONF_DIR/slurmdbd.conf"   # slurmdbd refuses a readable file

# ---- 5. cold start: wipe controller state and accounting, then slurmdbd + slurmctld -----------
if ! running_ok; then
  log "cold start (state and accounting wiped; job ids restart at 1)"
  stop_slurm
  rm -rf "$ROOT/state" "$ROOT/spool"; mkdir -p "$ROOT/state" "$ROOT/spool"
  sql -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'sinkscope';
          CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'sinkscope';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  slurmdbd
  for _ in $(seq 150); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -n show cluster >/dev/null 2>&1 || die "slurmdbd did not answer: $LOG/slurmdbd.log"
  sacctmgr -i add cluster sinkscope >/dev/null
  slurmctld -c -i
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  scontrol ping | grep -q UP || die "slurmctld did not come up: $LOG/slurmctld.log"
fi

# ---- 6. slurmd(s) ---------------------------------------------------------------------------
for n in $(node_names); do
  alive "$RUN/slurmd-$n.pid" && continue
  mkdir -p "$ROOT/spool/$n"
  if [ "$NNODES" -gt 1 ]; then slurmd -N "$n"; else slurmd; fi
done

# ---- 7. wait until every node is idle --------------------------------------------------------
for _ in $(seq 150); do [ "$(idle_nodes)" -ge "$NNODES" ] && break; sleep 0.2; done
# nodes busy with jobs count as ready ("mixed"/"allocated"); drained/invalid ones do not
ready_nodes() { sinfo -h -t idle,mix,alloc -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}'; }
if [ "$(ready_nodes)" -lt "$NNODES" ]; then
  if [ -z "${_SINKSCOPE_SLURM_RETRY:-}" ]; then   # e.g. a node left INVAL by an older config: once, cold
    log "nodes not ready on a warm start: restarting cold once"; sinfo -R >&2 || true
    stop_slurm; _SINKSCOPE_SLURM_RETRY=1 exec bash "$0" start
  fi
  sinfo -R >&2 || true; tail -n 20 "$LOG"/slurm*.log >&2 || true
  die "Slurm nodes not ready after 30 s"
fi
sacct -n -X -j 1 >/dev/null 2>&1 || die "sacct does not work: $LOG/slurmdbd.log"
log "Slurm up: MaxArraySize=$MAX_ARRAY, $NNODES node(s) x $NCPUS CPUs, $NGPUS fake GPU(s)/node, root $ROOT"
