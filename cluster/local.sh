#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, on loopback, with token authentication:
# one head node and one worker node, each a `ray start --block` process of its own.
#
#   cluster/local.sh up        start it (idempotent), print the address, Jobs URL and client env
#   cluster/local.sh status    nodes alive (exit 1 when the cluster is not running)
#   cluster/local.sh env       the exports a client needs: eval "$(cluster/local.sh env)"
#   cluster/local.sh down      stop it (only this cluster's processes)
#
# Why `ray start --block` in the background instead of plain `ray start`: `ray stop` has
# no way to pick a cluster, it kills every Ray process of the user on the machine (other
# people's `ray.init()` included). A blocking `ray start` owns its node's processes and
# tears them down on SIGTERM, so `down` signals just our two PIDs.
#
# Settings (environment):
#   DML_CLUSTER_STATE      token, PIDs, logs, client env     (default: cluster/.local)
#   DML_CLUSTER_TEMP       Ray temp dirs: head/ and worker/  (default: /tmp/ray-local-$USER)
#   DML_CLUSTER_PORT       GCS port; the other ports follow  (default: 26379, dashboard 26380)
#   DML_CLUSTER_HEAD_CPUS / DML_CLUSTER_WORKER_CPUS   logical CPUs per node (default: 4 / 4)
#   DML_CLUSTER_OBJECT_STORE_MB                       object store per node (default: 512)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DML_CLUSTER_STATE:-$ROOT/cluster/.local}"
USER_NAME="${USER:-$(id -un)}"
TEMP="${DML_CLUSTER_TEMP:-/tmp/ray-local-$USER_NAME}"
BASE="${DML_CLUSTER_PORT:-26379}"
HEAD_CPUS="${DML_CLUSTER_HEAD_CPUS:-4}"
WORKER_CPUS="${DML_CLUSTER_WORKER_CPUS:-4}"
OBJ_BYTES=$(( ${DML_CLUSTER_OBJECT_STORE_MB:-512} * 1024 * 1024 ))
IP=127.0.0.1
VENV_BIN="${DML_CLUSTER_VENV_BIN:-$ROOT/.venv/bin}"
RAY="$VENV_BIN/ray"

# Ports. Below Linux's ephemeral range (32768-60999) so that no outgoing connection of
# another process can be holding one; none is a Ray default (6379, 8265, 10001, 52365).
GCS_PORT=$BASE
DASH_PORT=$((BASE + 1))
CLIENT_PORT=$((BASE + 2))
# per node: node manager, object manager, dashboard agent HTTP, agent gRPC, runtime env agent, metrics
HEAD_PORTS=($((BASE + 3)) $((BASE + 4)) $((BASE + 5)) $((BASE + 6)) $((BASE + 7)) $((BASE + 8)))
WORKER_PORTS=($((BASE + 13)) $((BASE + 14)) $((BASE + 15)) $((BASE + 16)) $((BASE + 17)) $((BASE + 18)))
HEAD_WORKER_RANGE=($((BASE + 100)) $((BASE + 199)))
WORKER_WORKER_RANGE=($((BASE + 200)) $((BASE + 299)))

TOKEN="$STATE/auth_token"
ENV_FILE="$STATE/cluster.env"
START_TIMEOUT_S="${DML_CLUSTER_START_TIMEOUT_S:-120}"

die() { echo "local.sh: error: $*" >&2; exit 1; }
say() { echo "local.sh: $*" >&2; }

# The environment a client runs with. Token auth is explicit (RAY_AUTH_MODE=token), and
# the token is this cluster's own file, not ~/.ray/auth_token, which a plain `ray.init()`
# on this machine may create or reuse. RAY_ADDRESS is the Jobs API (`ray job ...`).
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as 127.0.0.1 in Ray clients that talk
# to the GCS (`ray status`, a driver with RAY_ADDRESS=<gcs>); without it they dial the
# machine's outward IP, where nothing listens (see cluster/loopback_ray_start.py).
client_env() {
    cat <<EOF
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN
export RAY_ADDRESS=http://$IP:$DASH_PORT
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF
}

alive() {  # alive NAME -> 0 when NAME.pid names a running node of ours (not a reused PID)
    local f="$STATE/$1.pid"
    [[ -f "$f" ]] && tr '\0' ' ' < "/proc/$(cat "$f")/cmdline" 2>/dev/null | grep -q "loopback_ray_start.py start"
}

busy_ports() {  # busy_ports PORT... -> prints those of PORT... that something listens on
    local p out=""
    for p in "$@"; do
        [[ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]] || out+="$p "
    done
    echo "$out"
}

make_token() {
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    if [[ ! -s "$TOKEN" ]]; then
        # 256 bits, like `ray get-auth-token --generate`, but into this cluster's own file.
        (umask 077 && "$VENV_BIN/python" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN")
        say "generated a new auth token in $TOKEN"
    fi
    chmod 600 "$TOKEN"
}

start_node() {  # start_node NAME ARGS... -> backgrounds `ray start --block ARGS`, waits until it is up
    local name=$1; shift
    local log="$STATE/$name.log"
    : > "$log"
    # setsid: the node must outlive this shell and must not get the terminal's Ctrl-C.
    # PATH: `ray job submit` entrypoints (`python -m jobs.train`) run in the nodes' env
    # and must find the project's venv.
    (
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" PATH="$VENV_BIN:$PATH"
        # SIGTERM drains the node first; an idle local node needs seconds, not Ray's 30.
        export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5
        # On a busy 2-core box the dashboard agent has been seen to need 18s to come up;
        # Ray's default of 15s then kills the raylet ("Timed out waiting for file
        # .../dashboard_agent_listen_port_..."). Same for worker processes.
        export RAY_agent_register_timeout_ms=120000 RAY_worker_register_timeout_seconds=120
        export RAY_USAGE_STATS_ENABLED=0
        unset RAY_ADDRESS
        # loopback_ray_start.py: plain `ray start` would swap 127.0.0.1 for the machine's
        # outward IP and then bind GCS/raylet ports on all interfaces (see that file).
        exec setsid "$VENV_BIN/python" "$ROOT/cluster/loopback_ray_start.py" \
            start --block --disable-usage-stats "$@" </dev/null >>"$log" 2>&1
    ) &
    echo $! > "$STATE/$name.pid"
    local t=0
    until grep -q "Ray runtime started" "$log"; do
        if ! alive "$name"; then
            tail -n 30 "$log" >&2
            die "the $name node exited during start; full log: $log"
        fi
        (( t++ < START_TIMEOUT_S )) || die "the $name node did not start within ${START_TIMEOUT_S}s; log: $log"
        sleep 1
    done
}

nodes_alive() {  # prints the number of alive nodes, asking the GCS with the cluster's token
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "$VENV_BIN/python" - "$IP:$GCS_PORT" <<'EOF'
import sys
from ray._raylet import GcsClient  # the client `ray status` uses
from ray.core.generated.gcs_pb2 import GcsNodeInfo

nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
print(sum(1 for n in nodes.values() if n.state == GcsNodeInfo.ALIVE))
EOF
}

print_info() {
    client_env > "$ENV_FILE"
    chmod 600 "$ENV_FILE"
    cat <<EOF
Ray cluster up: 2 nodes on $IP (head $HEAD_CPUS CPUs, worker $WORKER_CPUS CPUs), token auth on.
  GCS address     $IP:$GCS_PORT
  Dashboard/Jobs  http://$IP:$DASH_PORT
  token           $TOKEN
  Ray temp dir    $TEMP
  logs            $STATE/{head,worker}.log, $TEMP/{head,worker}/session_latest/logs
A client needs (also in $ENV_FILE; eval "\$(cluster/local.sh env)"):
$(client_env | sed 's/^/  /')
A driver started directly on this machine (python -m jobs.train, no job submission) needs
the same with RAY_ADDRESS=$IP:$GCS_PORT (the GCS).
Submit:
  ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
    python -m jobs.train --config configs/quickstart.yaml \\
      data.train=\$PWD/data/quickstart/train data.eval=\$PWD/data/quickstart/holdout \\
      tracking.uri=sqlite:///\$PWD/mlflow.db train.storage_path=\$PWD/runs
EOF
}

cmd_up() {
    [[ -x "$RAY" ]] || die "$RAY not found; run 'make install' first (needs ray[default])"
    if alive head && alive worker; then
        say "already running"
        print_info
        return 0
    fi
    if alive head || alive worker; then
        say "a partial cluster is running; stopping it first"
        cmd_down
    fi
    local busy
    busy=$(busy_ports $GCS_PORT $DASH_PORT $CLIENT_PORT "${HEAD_PORTS[@]}" "${WORKER_PORTS[@]}")
    [[ -z "$busy" ]] || die "port(s) $busy in use (another cluster?); pick other ports with DML_CLUSTER_PORT=<gcs port>"
    make_token
    # One temp dir per node: nodes sharing one session dir share runtime_resources/, and a
    # node unpacking a job's working_dir deletes and recreates the directory the job's
    # driver already runs in (seen: the driver's os.getcwd() -> FileNotFoundError).
    mkdir -p "$TEMP/head" "$TEMP/worker"
    start_node head --head \
        --node-ip-address=$IP --port=$GCS_PORT --temp-dir="$TEMP/head" \
        --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory=$OBJ_BYTES \
        --include-dashboard=true --dashboard-host=$IP --dashboard-port=$DASH_PORT \
        --ray-client-server-port=$CLIENT_PORT \
        --node-manager-port=${HEAD_PORTS[0]} --object-manager-port=${HEAD_PORTS[1]} \
        --dashboard-agent-listen-port=${HEAD_PORTS[2]} --dashboard-agent-grpc-port=${HEAD_PORTS[3]} \
        --runtime-env-agent-port=${HEAD_PORTS[4]} --metrics-export-port=${HEAD_PORTS[5]} \
        --min-worker-port=${HEAD_WORKER_RANGE[0]} --max-worker-port=${HEAD_WORKER_RANGE[1]}
    start_node worker --address=$IP:$GCS_PORT \
        --node-ip-address=$IP --temp-dir="$TEMP/worker" \
        --num-cpus="$WORKER_CPUS" --num-gpus=0 --object-store-memory=$OBJ_BYTES \
        --node-manager-port=${WORKER_PORTS[0]} --object-manager-port=${WORKER_PORTS[1]} \
        --dashboard-agent-listen-port=${WORKER_PORTS[2]} --dashboard-agent-grpc-port=${WORKER_PORTS[3]} \
        --runtime-env-agent-port=${WORKER_PORTS[4]} --metrics-export-port=${WORKER_PORTS[5]} \
        --min-worker-port=${WORKER_WORKER_RANGE[0]} --max-worker-port=${WORKER_WORKER_RANGE[1]}
    local t=0 n=0
    until [[ "$n" == 2 ]]; do
        n=$(nodes_alive 2>/dev/null || echo 0)
        (( t++ < 30 )) || die "only $n of 2 nodes alive after 30s; logs in $STATE"
        [[ "$n" == 2 ]] || sleep 1
    done
    print_info
}

stop_node() {  # stop_node NAME -> SIGTERM the node, wait, SIGKILL it and what is left of its session
    local name=$1 f="$STATE/$1.pid"
    [[ -f "$f" ]] || return 0
    local pid
    pid=$(cat "$f")
    if alive "$name"; then  # not a stale PID file naming someone else's process
        kill -TERM "$pid" 2>/dev/null || true
        local t=0
        while kill -0 "$pid" 2>/dev/null && (( t++ < 40 )); do sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            say "the $name node did not stop in 20s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # Leftovers (workers that outlived their raylet) are in the node's own session: setsid
    # made the `ray start` PID the session id, so this cannot reach another Ray instance.
    local left
    left=$(ps -eo pid=,sid=,args= | awk -v s="$pid" '$2 == s && $1 != s && /ray/ {print $1}')
    if [[ -n "$left" ]]; then
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    rm -f "$f"
}

cmd_down() {
    if [[ ! -f "$STATE/head.pid" && ! -f "$STATE/worker.pid" ]]; then
        say "not running"
        return 0
    fi
    stop_node worker
    stop_node head
    rm -f "$ENV_FILE"
    say "stopped"
}

cmd_status() {
    if ! alive head; then
        echo "not running (no head node; start it with: cluster/local.sh up)"
        return 1
    fi
    local n
    n=$(nodes_alive) || die "the head process runs but its GCS at $IP:$GCS_PORT does not answer; see $STATE/head.log"
    echo "nodes alive: $n"
    echo "dashboard/Jobs: http://$IP:$DASH_PORT"
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
        "$RAY" status --address "$IP:$GCS_PORT" 2>/dev/null \
        | sed -n '/Node status/,/Demands/p' || true
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) client_env ;;
    *) echo "usage: cluster/local.sh up|down|status|env" >&2; exit 2 ;;
esac
