#!/usr/bin/env bash
# Start mg-ray's local stack on loopback: a Ray head with token authentication and an MLflow
# tracking server (sqlite backend, proxied artifact store), both under $MG_RAY_HOME/stack.
#
#   . .venv/bin/activate                 # the head runs jobs with *this* python: start it from the venv
#   infra/local/start.sh [--num-cpus N] [--num-gpus N] [--mlflow-auth]
#   source infra/local/env.sh            # RAY_ADDRESS, RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI
#   infra/local/stop.sh
#
# Ports, paths and switches: see infra/local/config.sh (all overridable with MG_RAY_* variables)
# and infra/README.md.
#
# What it does, in order:
#   1. creates the stack dir and a random Ray auth token in it (mode 600), once;
#   2. starts `mlflow server` bound to 127.0.0.1 in its own session (pid file = process group);
#   3. starts `ray start --head --block` bound to 127.0.0.1 in its own session, with
#      RAY_AUTH_MODE=token, and with MG_RAY_HOME / MLFLOW_TRACKING_URI in its environment so every
#      job and worker on this node writes to the stack;
#   4. waits for MLflow's /health and for `ray status`, or fails pointing at the log.
# Running it again while the stack is up does nothing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NUM_CPUS="${MG_RAY_NUM_CPUS:-}"
NUM_GPUS="${MG_RAY_NUM_GPUS:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --num-cpus) NUM_CPUS="$2"; shift 2 ;;
        --num-gpus) NUM_GPUS="$2"; shift 2 ;;
        --mlflow-auth) export MG_RAY_MLFLOW_AUTH=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "start.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=infra/local/config.sh
source "$HERE/config.sh"

die() { echo "start.sh: $*" >&2; exit 1; }

is_running() {   # is_running PID_FILE: the recorded process is alive
    [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

port_in_use() {  # port_in_use PORT: something accepts connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

http_ok() {      # http_ok URL: GET answers 2xx
    python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1"
}

# Start a command detached in its own session, so its pid is also its process group id and
# stop.sh can end it and everything it spawned, and nothing else.
start_detached() {  # start_detached PID_FILE LOG_FILE CMD...
    local pid_file="$1" log_file="$2"
    shift 2
    python -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
        </dev/null >>"$log_file" 2>&1 &
    echo $! >"$pid_file"
}

wait_until() {  # wait_until WHAT LOG PID_FILE CMD...: poll CMD until it succeeds
    local what="$1" log="$2" pid_file="$3" deadline=$((SECONDS + START_TIMEOUT))
    shift 3
    until "$@" >/dev/null 2>&1; do
        if ! is_running "$pid_file"; then
            tail -n 30 "$log" >&2 || true
            die "$what exited during start-up; its log: $log"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$log" >&2 || true
            die "$what not ready after ${START_TIMEOUT}s (MG_RAY_START_TIMEOUT); its log: $log"
        fi
        sleep 1
    done
}

# --- preflight ------------------------------------------------------------------------------
command -v ray >/dev/null || die "'ray' not on PATH: activate the project's venv (. .venv/bin/activate)"
command -v mlflow >/dev/null || die "'mlflow' not on PATH: activate the project's venv"
command -v python >/dev/null || die "'python' not on PATH: activate the project's venv"
# `ray job submit -- python jobs/tune.py` runs `python` from the head's PATH: make it the
# interpreter that has ray (and, in the venv, mg_ray) installed.
PATH="$(dirname "$(command -v ray)"):$PATH"
export PATH
python -c 'import mg_ray' 2>/dev/null \
    || echo "start.sh: warning: 'python' cannot import mg_ray; jobs will fail (pip install -e .)" >&2
python -c 'import aiohttp, ray.dashboard' 2>/dev/null \
    || die "the Ray dashboard (job API) needs ray[default]: pip install 'ray[default]'"

mkdir -p "$STACK_DIR" "$MLFLOW_ARTIFACTS"
chmod 700 "$STACK_DIR"

if is_running "$RAY_PID_FILE" && is_running "$MLFLOW_PID_FILE"; then
    echo "local stack already running (pids $(cat "$RAY_PID_FILE"), $(cat "$MLFLOW_PID_FILE")); stop it with infra/local/stop.sh"
    exit 0
fi
if is_running "$RAY_PID_FILE" || is_running "$MLFLOW_PID_FILE"; then
    die "half of the stack is running; run infra/local/stop.sh first"
fi
for port in "$RAY_PORT" "$DASHBOARD_PORT" "$MLFLOW_PORT"; do
    port_in_use "$port" && die "port $port on 127.0.0.1 is taken; pick others with MG_RAY_*_PORT (infra/local/config.sh)"
done

# --- Ray auth token ---------------------------------------------------------------------------
# Our own token file rather than ~/.ray/auth_token, so the stack does not touch (or depend on)
# tokens of other clusters this user runs. An exported RAY_AUTH_TOKEN seeds it.
if [[ ! -s "$RAY_TOKEN_FILE" ]]; then
    (
        umask 077
        if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
            printf '%s' "$RAY_AUTH_TOKEN" >"$RAY_TOKEN_FILE"
        else
            python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_TOKEN_FILE"
        fi
    )
fi
chmod 600 "$RAY_TOKEN_FILE"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RAY_TOKEN_FILE"
unset RAY_AUTH_TOKEN

# --- MLflow tracking server ---------------------------------------------------------------------
mlflow_args=(
    server
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
    --backend-store-uri "sqlite:///$MLFLOW_BACKEND_DB"
    # Clients upload/download artifacts through the server (mlflow-artifacts:/ URIs): they need
    # no access to this folder.
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS"
)
if [[ "$MLFLOW_AUTH" == 1 ]]; then
    python -c 'import flask_wtf' 2>/dev/null || die "MLflow basic-auth needs mlflow[auth]: pip install 'mlflow[auth]'"
    [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] \
        || die "MG_RAY_MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD in the environment (used once, to create the admin user)"
    # Session signing key: from the environment, else one random key kept in the stack dir.
    if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
        [[ -s "$MLFLOW_SECRET_KEY_FILE" ]] \
            || (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$MLFLOW_SECRET_KEY_FILE")
        MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$MLFLOW_SECRET_KEY_FILE")"
        export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    # MLflow's bundled basic_auth.ini keeps its user db in ./basic_auth.db (relative to the cwd):
    # point it into the stack dir. The admin password is not in this file.
    cat >"$MLFLOW_AUTH_INI" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$MLFLOW_AUTH_DB
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    export MLFLOW_AUTH_CONFIG_PATH="$MLFLOW_AUTH_INI"
    mlflow_args+=(--app-name basic-auth)
fi
echo "starting MLflow on $MLFLOW_URL (log: $MLFLOW_LOG)"
: >"$MLFLOW_LOG"
# MLflow's background job runner (GenAI evaluation jobs, 7 huey consumer processes) is not used
# by mg-ray: off unless asked for.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    start_detached "$MLFLOW_PID_FILE" "$MLFLOW_LOG" mlflow "${mlflow_args[@]}"
# The server process does not need these; keep them out of Ray's environment below.
unset MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_CONFIG_PATH

# --- Ray head -------------------------------------------------------------------------------------
ray_args=(
    start --head --block
    --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
    --port="$RAY_PORT" --dashboard-port="$DASHBOARD_PORT"
    --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT"
    --temp-dir="$RAY_TEMP_DIR"
    --disable-usage-stats
)
[[ -n "$NUM_CPUS" ]] && ray_args+=(--num-cpus="$NUM_CPUS")
[[ -n "$NUM_GPUS" ]] && ray_args+=(--num-gpus="$NUM_GPUS")
if python -c 'import ray.util.client.server' 2>/dev/null && python -c 'import grpc' 2>/dev/null; then
    ray_args+=(--ray-client-server-port="$CLIENT_PORT")
fi
echo "starting Ray head: GCS 127.0.0.1:$RAY_PORT, dashboard/jobs $RAY_DASHBOARD_URL (log: $RAY_LOG, Ray logs: $RAY_TEMP_DIR/session_latest/logs)"
: >"$RAY_LOG"
# Inherited by every job driver and worker on this node: outputs go to the stack's locations.
# No drain on SIGTERM (it waits up to 30 s for Serve replicas; there are none here). RAY_ADDRESS:
# what in the cluster's processes asks Ray's State API without an address (Ray Train's
# placement-group cleaner, which frees the CPUs of a trial ASHA stopped) finds this cluster,
# not "the" cluster of this host, which fails while another one runs here (a private study's).
MG_RAY_HOME="$MG_RAY_HOME" MLFLOW_TRACKING_URI="$MLFLOW_URL" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    RAY_ADDRESS="127.0.0.1:$RAY_PORT" \
    start_detached "$RAY_PID_FILE" "$RAY_LOG" ray "${ray_args[@]}"

# --- readiness ------------------------------------------------------------------------------------
wait_until "MLflow server" "$MLFLOW_LOG" "$MLFLOW_PID_FILE" http_ok "$MLFLOW_URL/health"
wait_until "Ray head" "$RAY_LOG" "$RAY_PID_FILE" ray status --address "127.0.0.1:$RAY_PORT"
wait_until "Ray job API" "$RAY_LOG" "$RAY_PID_FILE" ray job list --address "$RAY_DASHBOARD_URL"
ln -sfn "$RAY_TEMP_DIR/session_latest/logs" "$STACK_DIR/ray-logs"

cat <<EOF
local stack up:
  Ray job API / dashboard  $RAY_DASHBOARD_URL   (token auth; token file $RAY_TOKEN_FILE)
  Ray GCS                  127.0.0.1:$RAY_PORT
  MLflow UI + API          $MLFLOW_URL$([[ "$MLFLOW_AUTH" == 1 ]] && echo "   (basic-auth)")
  MLflow runs of a study   $MLFLOW_URL/#/experiments/<id>?workflowType=machine_learning  (the study prints its link)
  logs                     $STACK_DIR/{mlflow.log,ray-head.log,ray-logs/}
next:
  source infra/local/env.sh
  infra/local/stop.sh
EOF
