#!/usr/bin/env bash
# The environment a client of the local stack needs (ray CLI, `ray job submit`, MLflow clients).
#
#   source infra/local/env.sh          # exports into the current shell
#   eval "$(infra/local/env.sh)"       # the same, from any shell
#   infra/local/env.sh                 # prints the export lines
#
# Uses the same MG_RAY_* overrides as start.sh (infra/local/config.sh). The token itself is never
# printed: RAY_AUTH_TOKEN_PATH points at the file start.sh wrote (mode 600).
#
# Ray 2.60 clients only send the token when RAY_AUTH_MODE=token is set in *their* environment;
# the token is then read from RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.

_mg_ray_env_lines() (   # a subshell: config.sh's variables stay out of the caller's shell
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    # shellcheck source=infra/local/config.sh
    source "$here/config.sh"
    printf 'export MG_RAY_HOME=%q\n' "$MG_RAY_HOME"
    printf 'export RAY_ADDRESS=%q\n' "$RAY_DASHBOARD_URL"
    printf 'export RAY_AUTH_MODE=token\n'
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$RAY_TOKEN_FILE"
    printf 'unset RAY_AUTH_TOKEN\n'   # it would win over RAY_AUTH_TOKEN_PATH
    printf 'export MLFLOW_TRACKING_URI=%q\n' "$MLFLOW_URL"
    if [[ "$MLFLOW_AUTH" == 1 ]]; then
        printf '# MLflow basic-auth is on: also export MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD\n'
    fi
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    _mg_ray_env_lines
else
    eval "$(_mg_ray_env_lines)"
fi
unset -f _mg_ray_env_lines
