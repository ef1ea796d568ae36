#!/usr/bin/env bash
# Stop the local stack that infra/local/start.sh started, and nothing else.
#
#   infra/local/stop.sh
#
# Use the same MG_RAY_* overrides as for start.sh (they locate the stack dir and its pid files).
# Each server was started as the leader of its own session, so its pid is also the id of its
# process group: SIGTERM to the leader, wait, then SIGTERM/SIGKILL to whatever is left of the
# group (Ray workers, uvicorn workers). We deliberately do not run `ray stop`: it kills every Ray
# process of this user, including other people's / other projects' clusters on a shared machine.
#
# Idempotent: a missing pid file or a dead process is not an error. Data (MLflow db, artifacts,
# token) stays in the stack dir; delete $MG_RAY_STACK_DIR to start from scratch.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=infra/local/config.sh
source "$HERE/config.sh"

STOP_TIMEOUT="${MG_RAY_STOP_TIMEOUT:-30}"

group_alive() {  # group_alive PGID: some process of the group still runs (zombies don't count)
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

wait_gone() {  # wait_gone PGID SECONDS: true once the group is empty
    local deadline=$((SECONDS + $2))
    while group_alive "$1"; do
        ((SECONDS >= deadline)) && return 1
        sleep 0.5
    done
}

stop_group() {  # stop_group NAME PID_FILE
    local name="$1" pid_file="$2" pid
    if [[ ! -f "$pid_file" ]]; then
        echo "$name: not running (no $pid_file)"
        return 0
    fi
    pid="$(cat "$pid_file")"
    if ! [[ "$pid" =~ ^[0-9]+$ ]]; then
        echo "$name: ignoring malformed pid file $pid_file" >&2
        rm -f "$pid_file"
        return 0
    fi
    if ! group_alive "$pid"; then
        echo "$name: not running (stale pid $pid)"
        rm -f "$pid_file"
        return 0
    fi
    echo "$name: stopping process group $pid"
    # The leader first: `ray start --block` and mlflow shut their children down themselves.
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
        echo "$name: still running after ${STOP_TIMEOUT}s, terminating the group" >&2
        kill -TERM -- "-$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || kill -KILL -- "-$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || { echo "$name: process group $pid survived SIGKILL" >&2; return 1; }
    fi
    rm -f "$pid_file"
    echo "$name: stopped"
}

status=0
stop_group "Ray head" "$RAY_PID_FILE" || status=1
stop_group "MLflow server" "$MLFLOW_PID_FILE" || status=1
rm -f "$STACK_DIR/ray-logs"
exit "$status"
