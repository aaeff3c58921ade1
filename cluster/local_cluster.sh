#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head node (GCS, dashboard and job API on
# 127.0.0.1) plus one worker node, each a separate raylet with its own resources.
#
#   cluster/local_cluster.sh start    start head + worker (idempotent: refuses if running)
#   cluster/local_cluster.sh status   list the nodes (exit 1 if the cluster is not up)
#   cluster/local_cluster.sh env      print the exports a client needs: eval "$(cluster/local_cluster.sh env)"
#   cluster/local_cluster.sh stop     stop both nodes (only the processes this script started)
#   cluster/local_cluster.sh kill-worker   SIGKILL the worker node's raylet and everything on it, at once:
#                                     a lost node (spot reclaim, hardware), for trying out recovery
#
# Settings (environment): LAASP_CLUSTER_DIR (state: token, temp dirs, logs, session ids;
# keep it short, Ray's socket paths must stay under 107 characters), LAASP_RAY_PORT (GCS, 6379),
# LAASP_DASHBOARD_PORT (8265), LAASP_CLIENT_PORT (Ray Client, 10001), LAASP_NODE_CPUS (2 per node),
# LAASP_OBJECT_STORE_BYTES (per node, 1e9), LAASP_VENV (.venv of the repo), LAASP_STOP_GRACE_S
# (seconds between TERM and KILL on stop, 10).
#
# Ray 2.60 enables token authentication by default: this script writes a token into the
# state dir and exports RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH for both nodes; clients
# (`ray job submit`, `ray.init(address=...)`) need the same two variables (see `env`).
# `ray stop` is never used: it would kill every Ray process on the machine, embedded
# instances of other programs included. Each node is started in its own session (setsid);
# stop signals the processes of those two sessions only (Ray's workers sit in their own
# process groups but stay in the session of the raylet that spawned them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LAASP_VENV:-$ROOT/.venv}
STATE=${LAASP_CLUSTER_DIR:-/tmp/laasp-cluster-$(id -u)}
PORT=${LAASP_RAY_PORT:-6379}
DASHBOARD_PORT=${LAASP_DASHBOARD_PORT:-8265}
CLIENT_PORT=${LAASP_CLIENT_PORT:-10001}
CPUS=${LAASP_NODE_CPUS:-2}
OBJECT_STORE=${LAASP_OBJECT_STORE_BYTES:-1000000000}
STOP_GRACE_S=${LAASP_STOP_GRACE_S:-10}

RAY="$VENV/bin/ray"
# Job entrypoints (`laasp-dist ...`) run with the PATH of the raylet that spawns them.
export PATH="$VENV/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"

alive() {  # alive NODE: is a process of the session recorded for NODE still running?
    local file="$STATE/$1.sid"
    [ -f "$file" ] && [ -n "$(session_pids "$(cat "$file")")" ]
}

session_pids() {  # session_pids SID: live (non-zombie) processes of a session
    ps -eo pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ {print $1}'
}

signal_session() {  # signal_session SIGNAL SID
    local pid
    for pid in $(session_pids "$2"); do
        kill "-$1" "$pid" 2>/dev/null || true
    done
}

start_node() {  # start_node NAME ARGS...: `ray start ARGS` in a new session; records the session id
    local name=$1
    shift
    if ! setsid bash -c 'echo $$ > "$0"; exec "$@"' "$STATE/$name.sid" "$RAY" start "$@" \
        >"$STATE/$name.log" 2>&1; then
        echo "local_cluster: $name node failed to start; last lines of $STATE/$name.log:" >&2
        tail -n 5 "$STATE/$name.log" >&2
        return 1
    fi
}

cmd_start() {
    if alive head || alive worker; then
        echo "local_cluster: already running (state in $STATE); stop it first" >&2
        exit 1
    fi
    [ -x "$RAY" ] || { echo "local_cluster: no ray at $RAY (run make setup)" >&2; exit 1; }
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    [ -s "$RAY_AUTH_TOKEN_PATH" ] || "$VENV/bin/python" -c "import secrets; print(secrets.token_hex(32))" \
        >"$RAY_AUTH_TOKEN_PATH"
    chmod 600 "$RAY_AUTH_TOKEN_PATH"
    # Ray replaces a loopback --node-ip-address by the host's own IP for the node address;
    # the dashboard / job API honours --dashboard-host and stays on 127.0.0.1. The head's
    # dashboard agent (which runs submitted jobs) takes a free port too: the default, 52365,
    # may belong to another Ray on this machine, and then no job can be submitted.
    start_node head --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "$CPUS" \
        --resources '{"node_head": 1}' --object-store-memory "$OBJECT_STORE" \
        --include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --dashboard-agent-listen-port 0 \
        --ray-client-server-port "$CLIENT_PORT" --temp-dir "$STATE/head" --disable-usage-stats || { cmd_stop; exit 1; }
    # A second raylet on the same host: its own temp dir, resources and agent ports.
    start_node worker --address "127.0.0.1:$PORT" --num-cpus "$CPUS" \
        --resources '{"node_worker": 1}' --object-store-memory "$OBJECT_STORE" \
        --dashboard-agent-listen-port 0 --temp-dir "$STATE/worker" --disable-usage-stats || { cmd_stop; exit 1; }
    echo "local_cluster: up (GCS 127.0.0.1:$PORT, jobs http://127.0.0.1:$DASHBOARD_PORT, state $STATE)"
    echo "  eval \"\$($0 env)\"   # then: ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- laasp-dist ..."
}

cmd_stop() {
    local name sid waited=0
    for name in worker head; do
        [ -f "$STATE/$name.sid" ] && signal_session TERM "$(cat "$STATE/$name.sid")"
    done
    for name in worker head; do
        [ -f "$STATE/$name.sid" ] || continue
        sid=$(cat "$STATE/$name.sid")
        while [ -n "$(session_pids "$sid")" ] && [ "$waited" -lt "$STOP_GRACE_S" ]; do
            sleep 1
            waited=$((waited + 1))
        done
        signal_session KILL "$sid"
        rm -f "$STATE/$name.sid"
    done
    echo "local_cluster: stopped"
}

cmd_kill_worker() {
    if ! alive worker; then
        echo "local_cluster: the worker node is not running" >&2
        exit 1
    fi
    signal_session KILL "$(cat "$STATE/worker.sid")"
    rm -f "$STATE/worker.sid"
    echo "local_cluster: worker node killed"
}

cmd_status() {
    if ! alive head; then
        echo "local_cluster: not running (state in $STATE)"
        exit 1
    fi
    "$VENV/bin/python" - "127.0.0.1:$PORT" <<'EOF'
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
for node in ray.nodes():
    custom = sorted(k for k in node["Resources"] if k.startswith("node_"))
    state = "alive" if node["Alive"] else "dead"
    print(f"{node['NodeID'][:12]} {state:5s} {node['NodeManagerAddress']} CPU={node['Resources'].get('CPU', 0):g} {' '.join(custom)}")
EOF
    echo "jobs: http://127.0.0.1:$DASHBOARD_PORT"
}

cmd_env() {
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH='$RAY_AUTH_TOKEN_PATH'"
    echo "export RAY_API_SERVER_ADDRESS='http://127.0.0.1:$DASHBOARD_PORT'"
    echo "export RAY_USAGE_STATS_ENABLED=0"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    kill-worker) cmd_kill_worker ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 start|stop|status|env|kill-worker" >&2; exit 2 ;;
esac
