#!/usr/bin/env bash
# Start (or restart) the cluster's MLflow tracking server on the Ray head node.
#
# Bound to this node's private IP (Train workers on other nodes log there) and to 127.0.0.1
# (so `ray dashboard cluster/aws.yaml --port 5000 --remote-port 5000` can forward it to your
# laptop); never to all interfaces. The cloud firewall admits no outside traffic to port 5000.
# Runs from head_start_ray_commands in cluster/aws.yaml, aws-minimal.yaml and gcp.yaml.
#
#   bash ~/raygd/cluster/mlflow-server.sh [PORT]     # prints the tracking URI the nodes use
set -euo pipefail
PORT="${1:-5000}"
STATE="$HOME/mlflow"
mkdir -p "$STATE/artifacts"
PRIVATE_IP="$(hostname -I | awk '{print $1}')"
# A restart ends the previous server's whole session (gunicorn workers included), nothing else.
if [ -f "$STATE/server.pid" ]; then
  OLD="$(cat "$STATE/server.pid")"
  pkill -TERM -s "$OLD" || true
  for _ in $(seq 30); do pgrep -s "$OLD" > /dev/null || break; sleep 1; done
  pkill -KILL -s "$OLD" || true
fi
# raygd tracks runs only: MLflow's GenAI job runner (extra worker processes) stays off.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# gunicorn takes several --bind addresses: the private IP from --host, loopback from --gunicorn-opts.
setsid nohup mlflow server \
  --backend-store-uri "sqlite:///$STATE/mlflow.db" \
  --artifacts-destination "$STATE/artifacts" \
  --host "$PRIVATE_IP" --port "$PORT" --workers 2 \
  --gunicorn-opts "--bind 127.0.0.1:$PORT" \
  > "$STATE/server.log" 2>&1 &
echo $! > "$STATE/server.pid"
echo "http://$PRIVATE_IP:$PORT"
