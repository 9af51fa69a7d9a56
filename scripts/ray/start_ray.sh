#!/usr/bin/env bash
# A Ray head on this machine for sinkscope's tests and for trying the Ray executor (address != local).
#
#   scripts/ray/start_ray.sh [start|stop|status]
#
# start   idempotent: starts `ray start --head --block` in its own process group (so that stop ends exactly
#         the processes it started, never another Ray on the host), waits for the Jobs API, prints the
#         addresses. Auth off, 127.0.0.1 kept (RAY_AUTH_MODE=disabled, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
#         every driver needs the second one too: source the printed `export` line).
# stop    SIGTERM to that process group, SIGKILL after SINKSCOPE_RAY_STOP_WAIT (25) s (Ray heads may ignore
#         SIGTERM for ~20 s).
# status  exit 0 when the head answers, 3 when not.
#
# Knobs: SINKSCOPE_RAY_ROOT (${TMPDIR:-/tmp}/sinkscope-ray: temp dir, logs, pgid file),
#        SINKSCOPE_RAY_PORT (6390, GCS), SINKSCOPE_RAY_DASHBOARD_PORT (8266, Jobs + state API),
#        SINKSCOPE_RAY_CLIENT_PORT (20101), SINKSCOPE_RAY_AGENT_PORT (52375), SINKSCOPE_RAY_NUM_CPUS ($(nproc)),
#        SINKSCOPE_RAY_NUM_GPUS (unset: detected; N: advertise N GPUs, fake ones on a CPU machine),
#        SINKSCOPE_RAY_PYTHON (python with ray installed; default .venv/bin/python of the repo).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${SINKSCOPE_RAY_ROOT:-${TMPDIR:-/tmp}/sinkscope-ray}
PORT=${SINKSCOPE_RAY_PORT:-6390}
DASH=${SINKSCOPE_RAY_DASHBOARD_PORT:-8266}
CLIENT=${SINKSCOPE_RAY_CLIENT_PORT:-20101}
AGENT=${SINKSCOPE_RAY_AGENT_PORT:-52375}
NCPUS=${SINKSCOPE_RAY_NUM_CPUS:-$(nproc)}
PY=${SINKSCOPE_RAY_PYTHON:-$REPO/.venv/bin/python}
RAY=$(dirname "$PY")/ray
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
PGID_FILE=$ROOT/head.pgid

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

case "${1:-start}" in
  stop) stop; exit 0 ;;
  status) if group_alive && up; then echo "Ray head up: GCS 127.0.0.1:$PORT, Jobs API http://127.0.0.1:$DASH"; exit 0; else echo "Ray head not running"; exit 3; fi ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
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
