#!/usr/bin/env bash
# An MLflow tracking server for multi-node runs: every node logs to one place over HTTP, and
# artifacts (checkpoint/model.pt, config.yaml, plots) are uploaded through the server
# (--serve-artifacts), so nodes need no shared file system for them.
#
#   cluster/mlflow_server.sh start   start it (idempotent); prints the tracking URI
#   cluster/mlflow_server.sh status  exit 0 when it answers /health
#   cluster/mlflow_server.sh stop    stop it
#
# Then: python -m jobs.train ... tracking.uri=http://127.0.0.1:25000
#
# Settings (environment):
#   DML_MLFLOW_HOST       interface to bind (default 127.0.0.1). On a multi-node cluster,
#                         the head's private address, so that rank 0 on another node can
#                         log; never 0.0.0.0: the server has no authentication by default.
#   DML_MLFLOW_PORT       default 25000 (not 5000, which `mlflow ui` in README.md uses)
#   DML_MLFLOW_STATE      pid, log, and the default stores (default: cluster/.local/mlflow)
#   DML_MLFLOW_BACKEND    backend store URI (default: sqlite:///$DML_MLFLOW_STATE/mlflow.db;
#                         postgresql://... for a busy cluster)
#   DML_MLFLOW_ARTIFACTS  artifact destination (default: $DML_MLFLOW_STATE/mlartifacts;
#                         s3://bucket/mlflow on AWS)
#   DML_MLFLOW_WORKERS    server worker processes (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DML_MLFLOW_STATE:-$ROOT/cluster/.local/mlflow}"
HOST="${DML_MLFLOW_HOST:-127.0.0.1}"
PORT="${DML_MLFLOW_PORT:-25000}"
BACKEND="${DML_MLFLOW_BACKEND:-sqlite:///$STATE/mlflow.db}"
ARTIFACTS="${DML_MLFLOW_ARTIFACTS:-$STATE/mlartifacts}"
WORKERS="${DML_MLFLOW_WORKERS:-2}"
MLFLOW="${DML_MLFLOW_BIN:-$ROOT/.venv/bin/mlflow}"
PIDF="$STATE/server.pid"
LOG="$STATE/server.log"
START_TIMEOUT_S="${DML_MLFLOW_START_TIMEOUT_S:-120}"

die() { echo "mlflow_server.sh: error: $*" >&2; exit 1; }
say() { echo "mlflow_server.sh: $*" >&2; }

alive() { [[ -f "$PIDF" ]] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }
healthy() { curl -fsS --max-time 3 "http://$HOST:$PORT/health" >/dev/null 2>&1; }

cmd_start() {
    case "$HOST" in
        0.0.0.0|::|"[::]"|"*")
            die "refusing to bind $HOST: the server has no authentication; use 127.0.0.1 or a private address" ;;
    esac
    [[ -x "$MLFLOW" ]] || die "$MLFLOW not found; run 'make install' first"
    if alive && healthy; then
        say "already running"
        echo "tracking.uri=http://$HOST:$PORT"
        return 0
    fi
    alive && cmd_stop
    [[ -z "$(ss -Hltn "sport = :$PORT" 2>/dev/null)" ]] || die "port $PORT is in use; pick another with DML_MLFLOW_PORT"
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    [[ "$ARTIFACTS" == *://* ]] || mkdir -p "$ARTIFACTS"
    : > "$LOG"
    # setsid: the server and its workers form one session that `stop` can signal as a whole.
    setsid "$MLFLOW" server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
        --backend-store-uri "$BACKEND" --serve-artifacts --artifacts-destination "$ARTIFACTS" \
        </dev/null >>"$LOG" 2>&1 &
    echo $! > "$PIDF"
    local t=0
    until healthy; do
        alive || { tail -n 30 "$LOG" >&2; die "the server exited during start; log: $LOG"; }
        (( t++ < START_TIMEOUT_S )) || die "no answer on http://$HOST:$PORT/health after ${START_TIMEOUT_S}s; log: $LOG"
        sleep 1
    done
    say "up: backend $BACKEND, artifacts $ARTIFACTS, log $LOG"
    echo "tracking.uri=http://$HOST:$PORT"
}

cmd_stop() {
    if [[ ! -f "$PIDF" ]]; then
        say "not running"
        return 0
    fi
    local pid
    pid=$(cat "$PIDF")
    # Everything in the server's session (setsid made its PID the session id): the
    # server and its uvicorn workers, nothing else.
    local members
    members=$(ps -eo pid=,sid= | awk -v s="$pid" '$2 == s {print $1}')
    if [[ -n "$members" ]]; then
        # shellcheck disable=SC2086
        kill -TERM $members 2>/dev/null || true
        local t=0
        while kill -0 "$pid" 2>/dev/null && (( t++ < 20 )); do sleep 0.5; done
        members=$(ps -eo pid=,sid= | awk -v s="$pid" '$2 == s {print $1}')
        # shellcheck disable=SC2086
        [[ -z "$members" ]] || kill -KILL $members 2>/dev/null || true
    fi
    rm -f "$PIDF"
    say "stopped"
}

cmd_status() {
    if alive && healthy; then
        echo "running: http://$HOST:$PORT (backend $BACKEND, artifacts $ARTIFACTS)"
    else
        echo "not running"
        return 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: cluster/mlflow_server.sh start|stop|status" >&2; exit 2 ;;
esac
