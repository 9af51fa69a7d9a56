#!/usr/bin/env bash
# A Ray head on this machine for sinkscope's tests and for trying the Ray executor (address != local).
#
#   scripts/ray/start_ray.sh [start|stop|status|join|leave]
#
# start   idempotent: starts `ray start --head --block` in its own process group (so that stop ends exactly
#         the processes it started, never another Ray on the host), waits for the Jobs API, prints the
#         addresses. Auth off, 127.0.0.1 kept (RAY_AUTH_MODE=disabled, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
#         every driver needs the second one too: source the printed `export` line).
# stop    SIGTERM to that process group, SIGKILL after SINKSCOPE_RAY_STOP_WAIT (25) s (Ray heads may ignore
#         SIGTERM for ~20 s).
# status  exit 0 when the head answers, 3 when not.
# join    a second Ray node on this host, joined to the head (`ray start --address=127.0.0.1:PORT --block` with
#         its own ports, SINKSCOPE_RAY_NODE_CPUS CPUs, SINKSCOPE_RAY_NODE_GPUS GPUs), in its own process group,
#         so that a test can lose exactly that node (its raylet and its workers): `leave` SIGKILLs that group.
#         Two raylets on one host are what Ray's own multi-node tests use (ray.cluster_utils.Cluster).
# leave   SIGKILL the joined node's process group at once (a node loss, not a clean shutdown).
#
# Knobs: SINKSCOPE_RAY_ROOT (${TMPDIR:-/tmp}/sinkscope-ray: temp dir, logs, pgid file),
#        SINKSCOPE_RAY_PORT (6390, GCS), SINKSCOPE_RAY_DASHBOARD_PORT (8266, Jobs + state API),
#        SINKSCOPE_RAY_CLIENT_PORT (20101), SINKSCOPE_RAY_AGENT_PORT (52375), SINKSCOPE_RAY_NUM_CPUS ($(nproc)),
#        SINKSCOPE_RAY_NUM_GPUS (unset: detected; N: advertise N GPUs, fake ones on a CPU machine),
#        SINKSCOPE_RAY_PYTHON (python with ray installed; default .venv/bin/python of the repo, else python3 on PATH).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${SINKSCOPE_RAY_ROOT:-${TMPDIR:-/tmp}/sinkscope-ray}
PORT=${SINKSCOPE_RAY_PORT:-6390}
DASH=${SINKSCOPE_RAY_DASHBOARD_PORT:-8266}
CLIENT=${SINKSCOPE_RAY_CLIENT_PORT:-20101}
AGENT=${SINKSCOPE_RAY_AGENT_PORT:-52375}
NCPUS=${SINKSCOPE_RAY_NUM_CPUS:-$(nproc)}
PY=${SINKSCOPE_RAY_PYTHON:-$REPO/.venv/bin/python}
[ -n "${SINKSCOPE_RAY_PYTHON:-}" ] || [ -x "$PY" ] || PY=$(command -v python3 || command -v python)  # e.g. a worktree
RAY=$(dirname "$PY")/ray
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
PGID_FILE=$ROOT/head.pgid
NODE_PGID_FILE=$ROOT/node2.pgid

log() { echo "[start_ray] $*" >&2; }
up() { "$PY" - "$DASH" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=3).read()
PY
}
group_alive() { [ -s "$PGID_FILE" ] && kill -0 -- "-$(cat "$PGID_FILE")" 2>/dev/null; }

stop() {
  group_alive || { rm -f "$PGID_FILE"; return 0; }
  local g; g=$(cat "$PGID_FILE")
  kill -TERM -- "-$g" 2>/dev/null || true
  for _ in $(seq $(( ${SINKSCOPE_RAY_STOP_WAIT:-25} * 10 ))); do kill -0 -- "-$g" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$g" 2>/dev/null || true
  rm -f "$PGID_FILE"
  log "stopped Ray head (process group $g)"
}

leave() {  # its process group and every descendant: Ray workers may leave the group, they must die too
  [ -s "$NODE_PGID_FILE" ] || return 0
  "$PY" "$REPO/scripts/kill_tree.py" "$(cat "$NODE_PGID_FILE")" >&2 || kill -KILL -- "-$(cat "$NODE_PGID_FILE")" 2>/dev/null || true
  rm -f "$NODE_PGID_FILE"
  log "second node lost (process group SIGKILLed)"
}

join_once() {
  local gpu_args=()
  [ -n "${SINKSCOPE_RAY_NODE_GPUS:-}" ] && gpu_args=(--num-gpus="$SINKSCOPE_RAY_NODE_GPUS")
  # ports of its own: a second raylet on the head's host must not collide with the head's
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (kept for the head and drivers) makes `ray start --address` refuse to join
  # ("Multi-node Ray clusters are not supported"); at 1, `ray start` rewrites 127.0.0.1 in --address to the host's
  # outward address, where the head (bound to 127.0.0.1) does not listen. So this node runs `ray start` at 1 with
  # that one rewrite switched off in its own process (Ray offers no option for it).
  # a loaded machine starts the node's Python agents slowly: give them minutes to register where Ray lets us
  RAY_agent_register_timeout_ms=180000 RAY_raylet_start_wait_time_s=180 \
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 setsid "$PY" -c 'import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()' start --address="127.0.0.1:$PORT" --block --node-ip-address=127.0.0.1 \
    --num-cpus="${SINKSCOPE_RAY_NODE_CPUS:-1}" "${gpu_args[@]}" --node-manager-port=20110 --object-manager-port=20111 \
    --min-worker-port=20200 --max-worker-port=20299 --dashboard-agent-listen-port=52385 \
    --dashboard-agent-grpc-port=52386 --metrics-export-port=52387 --runtime-env-agent-port=52388 \
    --disable-usage-stats >"$ROOT/node2.log" 2>&1 </dev/null &
  echo $! > "$NODE_PGID_FILE"
  # joined when the head's state API lists two alive nodes (one python polls: importing ray takes seconds)
  if "$PY" - "$DASH" "$(cat "$NODE_PGID_FILE")" <<'PY'
import os, sys, time
from ray.util.state import list_nodes
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    try:
        os.killpg(int(sys.argv[2]), 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        if sum(n.state == "ALIVE" for n in list_nodes(address=f"http://127.0.0.1:{sys.argv[1]}", timeout=10)) >= 2:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
  then log "second node joined (process group $(cat "$NODE_PGID_FILE"))"; return 0; fi
  tail -n 5 "$ROOT/node2.log" >&2; leave; return 1
}

# Ray's raylet gives its dashboard agent a fixed ~15 s to write its port file and aborts otherwise (no setting for
# it in Ray 2.60); a loaded machine can need longer to import the agent, so a failed start is retried twice.
join() {
  [ -s "$NODE_PGID_FILE" ] && kill -0 -- "-$(cat "$NODE_PGID_FILE")" 2>/dev/null && { log "second node already joined"; return 0; }
  for attempt in 1 2 3; do
    join_once && return 0
    log "second node did not join (attempt $attempt)"
  done
  echo "[start_ray] ERROR: the second node did not join" >&2; exit 1
}

case "${1:-start}" in
  stop) leave; stop; exit 0 ;;
  join) join; exit 0 ;;
  leave) leave; exit 0 ;;
  status) if group_alive && up; then echo "Ray head up: GCS 127.0.0.1:$PORT, Jobs API http://127.0.0.1:$DASH"; exit 0; else echo "Ray head not running"; exit 3; fi ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status|join|leave]" >&2; exit 2 ;;
esac

[ -x "$RAY" ] || { echo "[start_ray] ERROR: $RAY not found (install sinkscope[ray])" >&2; exit 1; }
if group_alive && up; then
  log "already running"
else
  stop
  mkdir -p "$ROOT"
  GPU_ARGS=()
  [ -n "${SINKSCOPE_RAY_NUM_GPUS:-}" ] && GPU_ARGS=(--num-gpus="$SINKSCOPE_RAY_NUM_GPUS")
  # setsid: own process group (its id = the pid below), detached from the caller's terminal
  setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --include-dashboard=true \
    --ray-client-server-port="$CLIENT" --dashboard-agent-listen-port="$AGENT" --num-cpus="$NCPUS" "${GPU_ARGS[@]}" \
    --temp-dir="$ROOT/tmp" --disable-usage-stats >"$ROOT/head.log" 2>&1 </dev/null &
  echo $! > "$PGID_FILE"
  for _ in $(seq 600); do up && break; group_alive || break; sleep 0.1; done
  if ! up; then tail -n 30 "$ROOT/head.log" >&2; stop; echo "[start_ray] ERROR: Ray head did not come up" >&2; exit 1; fi
  log "Ray head up (process group $(cat "$PGID_FILE"))"
fi
echo "export RAY_ADDRESS=127.0.0.1:$PORT RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
echo "# Jobs/state API: http://127.0.0.1:$DASH   sinkscope: executor.address: 127.0.0.1:$PORT"
