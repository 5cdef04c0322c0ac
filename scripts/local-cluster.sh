#!/usr/bin/env bash
# A Ray cluster (one head) and an MLflow tracking server on 127.0.0.1, for running recipes as Ray jobs
# exactly as on a real cluster — started from the project's environment, stopped by the ids recorded at
# start (other Ray clusters on the machine are left alone).
#
#   bash scripts/local-cluster.sh start                       # head + MLflow server; prints their addresses
#   bash scripts/local-cluster.sh submit RECIPE [key.sub=value ...]  # e.g. jobs/own-data.yaml
#   bash scripts/local-cluster.sh submit sweep RECIPE [key.sub=value ...]
#   bash scripts/local-cluster.sh stop
#
# `submit` is `ray job submit --working-dir . -- python jobs/run.py ARGS tracking.tracking_uri=<the server>`
# with token auth on (RAY_AUTH_MODE=token, Ray 2.60's default). The head is started with the project's
# .venv/bin first on PATH: a job's entrypoint runs with the PATH of the process that started the head,
# so its `python` is the project's (a head started from a plain shell gives jobs the system Python,
# which has no torch). State (ports, process-group ids, logs, the MLflow store) lives in .local-cluster/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
state="$root/.local-cluster"
usage() { sed -n '6,9p' "$0" | sed 's/^# //' >&2; exit 2; }
[ $# -ge 1 ] || usage
command="$1"; shift

free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS DESCRIPTION PID LOG COMMAND...: 0 once COMMAND succeeds, 3 if PID exits first
  local deadline=$((SECONDS + $1)) what="$2" pid="$3" log="$4"; shift 4
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "local-cluster: $what exited while starting; its log ($log) ends:" >&2
      tail -n 5 "$log" | sed 's/^/  /' >&2; return 3; fi
    if [ $SECONDS -ge $deadline ]; then echo "local-cluster: $what did not come up (logs in $state)" >&2; return 1; fi
    sleep 1
  done
}

case "$command" in
  start)
    bash scripts/setup.sh
    if [ -f "$state/env" ]; then
      echo "local-cluster: already started ($state/env); run 'bash scripts/local-cluster.sh stop' first" >&2; exit 1
    fi
    mkdir -p "$state"
    export PATH="$root/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
    ray_tmp="$(mktemp -d /tmp/flexi-ray-XXXXXX)"  # short: Ray's unix socket paths are limited to ~107 bytes
    # every port of its own, so another Ray cluster on this machine (Ray's defaults) is never in the way
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a one-machine cluster whose servers all bind 127.0.0.1 (on Linux Ray
    # otherwise listens on every interface); jobs inherit it, so their drivers join at 127.0.0.1 too
    # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` SIGTERMs a job's driver and SIGKILLs it this many seconds later
    # (Ray's default: 3); each job's supervisor inherits it from the head. A driver stopped mid-training closes
    # its MLflow runs and disconnects in well under a second when idle, but under load it took over 3 s
    # (1 of 6 stops here), and a SIGKILLed driver leaves its runs RUNNING.
    # RAY_API_SERVER_ADDRESS: the state API of this head for every process of it (Ray Train's placement-group
    # cleaner asks it, with no address, whether a run's controller died; with two clusters on the machine Ray
    # could not tell which to ask, and the cleaner stopped watching)
    # Ports are picked free, then bound by the server seconds later; another process (a Ray worker, an
    # MLflow request) can take one in between, and the server then exits ("address already in use"; seen
    # once in CI, for MLflow's). So a server that exits while starting is started again on fresh ports.
    launch_ray() {
      gcs=$(free_port); dash=$(free_port)
      RAY_JOB_STOP_WAIT_TIME_S="${RAY_JOB_STOP_WAIT_TIME_S:-30}" RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dash" \
      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid .venv/bin/ray start --head --block --num-cpus="${FLEXI_CLUSTER_CPUS:-$(nproc)}" --port="$gcs" \
        --dashboard-host=127.0.0.1 --dashboard-port="$dash" --include-dashboard=true --temp-dir="$ray_tmp" \
        --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
        --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
        --ray-client-server-port="$(free_port)" >"$state/ray.log" 2>&1 &
      ray_pid=$!
    }
    launch_mlflow() {
      mlflow_port=$(free_port)
      MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid .venv/bin/mlflow server \
        --backend-store-uri "sqlite:///$state/mlflow.db" --default-artifact-root "$state/mlartifacts" \
        --host 127.0.0.1 --port "$mlflow_port" --workers 1 >"$state/mlflow.log" 2>&1 &
      mlflow_pid=$!
    }
    record() {
      cat >"$state/env" <<EOF
RAY_PGID=$ray_pid
MLFLOW_PGID=$mlflow_pid
RAY_TMP=$ray_tmp
RAY_DASHBOARD=http://127.0.0.1:$dash
MLFLOW_URI=http://127.0.0.1:$mlflow_port
EOF
    }
    launch_ray; launch_mlflow; record
    for attempt in 1 2 3; do
      if wait_for 120 "the Ray head" "$ray_pid" "$state/ray.log" .venv/bin/ray job list --address "http://127.0.0.1:$dash"
      then break; else rc=$?; fi
      if [ "$rc" -ne 3 ] || [ "$attempt" -eq 3 ]; then bash "$0" stop; exit 1; fi
      echo "local-cluster: starting the Ray head again on other ports" >&2
      launch_ray; record
    done
    for attempt in 1 2 3; do
      if wait_for 90 "the MLflow server" "$mlflow_pid" "$state/mlflow.log" .venv/bin/python -c \
           "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" \
           "http://127.0.0.1:$mlflow_port"
      then break; else rc=$?; fi
      if [ "$rc" -ne 3 ] || [ "$attempt" -eq 3 ]; then bash "$0" stop; exit 1; fi
      echo "local-cluster: starting the MLflow server again on another port" >&2
      launch_mlflow; record
    done
    echo "Ray head      http://127.0.0.1:$dash   (dashboard; token auth: RAY_AUTH_MODE=token)"
    echo "MLflow server http://127.0.0.1:$mlflow_port"
    ;;
  submit)
    [ $# -ge 1 ] || usage
    [ -f "$state/env" ] || { echo "local-cluster: not started; run 'bash scripts/local-cluster.sh start'" >&2; exit 1; }
    # shellcheck disable=SC1091
    source "$state/env"
    export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
    # The job runs in Ray's copy of the working directory, which Ray deletes later: a relative output_dir
    # is made absolute here, so results land in this checkout exactly where `flexi run` puts them (and a
    # job after a `flexi run` of the same recipe reuses its finished stages).
    out="$(.venv/bin/python - "$@" <<'PY'
import sys
from pathlib import Path
from flexi_workflows.recipes import load_recipe
args = sys.argv[1:]
if args and args[0] in ("run", "sweep"):
    args = args[1:]
recipe = load_recipe(args[0], args[1:])
print("" if Path(recipe.output_dir).is_absolute() else Path(recipe.output_dir).resolve())
PY
)" || exit 2
    extra=()
    [ -n "$out" ] && extra=("output_dir=$out")
    for attempt in 1 2 3 4 5 6 7 8 9 10; do  # the head's job agent comes up a little after its dashboard
      log="$(mktemp)"
      set +e
      .venv/bin/ray job submit --address "$RAY_DASHBOARD" --working-dir . -- \
        python jobs/run.py "$@" "${extra[@]}" "tracking.tracking_uri=$MLFLOW_URI" 2>&1 | tee "$log"
      rc=${PIPESTATUS[0]}
      set -e
      if ! grep -q "No available agent" "$log"; then rm -f "$log"; exit "$rc"; fi
      rm -f "$log"; sleep 3
    done
    exit 1
    ;;
  stop)
    [ -f "$state/env" ] || { echo "local-cluster: nothing to stop" >&2; exit 0; }
    # shellcheck disable=SC1091
    source "$state/env"
    # the head: SIGTERM to `ray start --block` alone, which stops its processes in order (about 5 s here);
    # SIGTERM to its whole process group at once left the GCS, raylet and agents running past 10 s
    kill -TERM "$RAY_PGID" 2>/dev/null || true
    kill -TERM -- "-$MLFLOW_PGID" 2>/dev/null || true
    # 10 s to stop gracefully, as `ray stop` gives (16 s): a raylet told to stop can take half a minute to
    # drain, and nothing of a local head outlives it (the MLflow store is kept, and is closed by then)
    for _ in $(seq 10); do
      kill -0 -- "-$RAY_PGID" 2>/dev/null || kill -0 -- "-$MLFLOW_PGID" 2>/dev/null || break
      sleep 1
    done
    for pgid in "$RAY_PGID" "$MLFLOW_PGID"; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
    rm -rf "$RAY_TMP"
    rm -f "$state/env"
    echo "stopped the local Ray head and MLflow server (store kept in $state)"
    ;;
  *) usage ;;
esac
