# shellcheck shell=bash
# Shared settings of the local stack, sourced by start.sh, stop.sh and env.sh.
#
# Every value can be overridden from the environment. Defaults:
#
#   MG_RAY_HOME                   ~/.mg-ray               everything a run writes (mg_ray/paths.py)
#   MG_RAY_STACK_DIR              $MG_RAY_HOME/stack      pid files, logs, token, server databases
#   MG_RAY_RAY_PORT               6379                    Ray GCS (what `ray start --address` joins)
#   MG_RAY_DASHBOARD_PORT         8265                    Ray dashboard + job API (`ray job submit`)
#   MG_RAY_DASHBOARD_AGENT_PORT   52365                   the head node's dashboard agent (HTTP)
#   MG_RAY_CLIENT_PORT            10001                   Ray Client server (ray://), if installed
#   MG_RAY_MLFLOW_PORT            5000                    MLflow tracking server + artifact proxy
#   MG_RAY_RAY_TEMP_DIR           /tmp/mg-ray-<uid>-<ray port>   Ray's session dir and logs; kept
#                                 short because Ray puts unix sockets in it (108-byte limit)
#   MG_RAY_MLFLOW_AUTH            0                       1: MLflow basic-auth (see infra/README.md)
#   MG_RAY_MLFLOW_WORKERS         2                       uvicorn workers of the MLflow server
#   MG_RAY_START_TIMEOUT          90                      seconds to wait for each server
#
# Ray picks worker ports in 10002-19999 by default: keep the ports above outside that range.

MG_RAY_HOME="${MG_RAY_HOME:-$HOME/.mg-ray}"
# Jobs run in a temporary copy of the working dir: a relative home would be lost with it.
case "$MG_RAY_HOME" in /*) ;; *) MG_RAY_HOME="$PWD/$MG_RAY_HOME" ;; esac
STACK_DIR="${MG_RAY_STACK_DIR:-$MG_RAY_HOME/stack}"
case "$STACK_DIR" in /*) ;; *) STACK_DIR="$PWD/$STACK_DIR" ;; esac

RAY_PORT="${MG_RAY_RAY_PORT:-6379}"
DASHBOARD_PORT="${MG_RAY_DASHBOARD_PORT:-8265}"
DASHBOARD_AGENT_PORT="${MG_RAY_DASHBOARD_AGENT_PORT:-52365}"
CLIENT_PORT="${MG_RAY_CLIENT_PORT:-10001}"
MLFLOW_PORT="${MG_RAY_MLFLOW_PORT:-5000}"
RAY_TEMP_DIR="${MG_RAY_RAY_TEMP_DIR:-/tmp/mg-ray-$(id -u)-$RAY_PORT}"
MLFLOW_AUTH="${MG_RAY_MLFLOW_AUTH:-0}"
MLFLOW_WORKERS="${MG_RAY_MLFLOW_WORKERS:-2}"
START_TIMEOUT="${MG_RAY_START_TIMEOUT:-90}"

# Files in the stack dir.
RAY_TOKEN_FILE="$STACK_DIR/ray_auth_token"   # the Ray auth token (mode 600), read via RAY_AUTH_TOKEN_PATH
RAY_PID_FILE="$STACK_DIR/ray-head.pid"       # `ray start --head --block`, leader of its own session
RAY_LOG="$STACK_DIR/ray-head.log"            # its stdout/stderr; Ray's own logs: $RAY_TEMP_DIR/session_latest/logs
MLFLOW_PID_FILE="$STACK_DIR/mlflow.pid"      # `mlflow server`, leader of its own session
MLFLOW_LOG="$STACK_DIR/mlflow.log"
MLFLOW_BACKEND_DB="$STACK_DIR/mlflow-server.db"
MLFLOW_ARTIFACTS="$STACK_DIR/mlartifacts"
MLFLOW_AUTH_INI="$STACK_DIR/basic_auth.ini"  # no secrets inside: the admin password comes from env
MLFLOW_AUTH_DB="$STACK_DIR/mlflow-auth.db"
MLFLOW_SECRET_KEY_FILE="$STACK_DIR/mlflow_flask_secret_key"

RAY_DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
