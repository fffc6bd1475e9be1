#!/usr/bin/env bash
# Start (or restart) the cluster's MLflow tracking server on the Ray head node.
#
# Bound to this node's private IP (Train workers on other nodes log there) and to 127.0.0.1
# (so `ray dashboard cluster/aws.yaml --port 5000 --remote-port 5000` can forward it to your
# laptop); never to all interfaces. The cloud firewall admits no outside traffic to port 5000.
# Runs from head_start_ray_commands in cluster/aws.yaml, aws-minimal.yaml and gcp.yaml.
#
# Backend store: the PostgreSQL database that cluster/postgres-setup.sh (head_setup_commands)
# made on this node, listening on 127.0.0.1 only; its password is in ~/.pgpass, which libpq
# reads, so the URI below carries none. Every trial of every sweep writes here concurrently,
# which a SQLite file serialises (cluster/README.md has the measured load). Artifacts go to
# ~/mlflow/artifacts on this node. Another store or a bucket: export, in head_start_ray_commands
# before this script, RAYGD_MLFLOW_BACKEND_STORE_URI (e.g. an RDS / Cloud SQL database; its
# password in ~/.pgpass) and RAYGD_MLFLOW_ARTIFACTS (e.g. s3://bucket/mlflow, the node's IAM role).
#
#   bash ~/raygd/cluster/mlflow-server.sh [PORT]     # prints the tracking URI the nodes use
set -euo pipefail
PORT="${1:-5000}"
STATE="$HOME/mlflow"
mkdir -p "$STATE/artifacts"
PRIVATE_IP="$(hostname -I | awk '{print $1}')"
STORE="${RAYGD_MLFLOW_BACKEND_STORE_URI:-$(cat "$STATE/backend-store-uri" 2>/dev/null || true)}"
ARTIFACTS="${RAYGD_MLFLOW_ARTIFACTS:-$STATE/artifacts}"
if [ -z "$STORE" ]; then
  echo "mlflow-server.sh: no backend store: run cluster/postgres-setup.sh first (head_setup_commands)" >&2
  exit 1
fi
# The local database may still be starting (a rebooted head): wait up to 60 s for it.
if [[ "$STORE" == *"@127.0.0.1:"* ]]; then
  PGPORT_LOCAL="${STORE##*@127.0.0.1:}"
  for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 -p "${PGPORT_LOCAL%%/*}" && break; sleep 1; done
fi
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
  --backend-store-uri "$STORE" \
  --artifacts-destination "$ARTIFACTS" \
  --host "$PRIVATE_IP" --port "$PORT" --workers 2 \
  --gunicorn-opts "--bind 127.0.0.1:$PORT" \
  > "$STATE/server.log" 2>&1 &
echo $! > "$STATE/server.pid"
echo "http://$PRIVATE_IP:$PORT"
