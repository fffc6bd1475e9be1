#!/usr/bin/env bash
# PostgreSQL on the Ray head node: the backend store of the cluster's MLflow server.
#
# Runs from head_setup_commands in cluster/aws.yaml, aws-minimal.yaml and gcp.yaml, right after
# `apt-get install postgresql` there (Debian's package: one cluster, started by systemd); safe to
# run again on every `ray up`. What it leaves:
# - the server listening on 127.0.0.1 only (listen_addresses), never on the node's other
#   interfaces: only processes on the head (the MLflow server) reach it. Debian's pg_hba.conf asks
#   for a password (scram-sha-256) on TCP.
# - a role and a database "mlflow". The role's password is generated here, on the head, the first
#   time, and kept only in ~/.pgpass (mode 600), where libpq (psycopg) reads it: it is never in the
#   repository, on a command line, in the store URI or in MLflow's logs.
# - ~/mlflow/backend-store-uri: the URI cluster/mlflow-server.sh passes to `mlflow server`.
#
#   bash ~/raygd/cluster/postgres-setup.sh        # prints that URI (without a password)
set -euo pipefail
DB=mlflow
STATE="$HOME/mlflow"
PGPASS="$HOME/.pgpass"
mkdir -p "$STATE"
as_postgres() { (cd / && sudo -u postgres "$@"); }
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 "$@"; }

read -r VERSION CLUSTER PORT STATUS _ < <(pg_lsclusters -h | head -n 1)
[ "$STATUS" = online ] || sudo pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
# Loopback only (Debian's default is "localhost", which also means ::1): set it and keep it set.
if [ "$(psql_admin -tAc 'SHOW listen_addresses')" != "127.0.0.1" ]; then
  psql_admin -c "ALTER SYSTEM SET listen_addresses = '127.0.0.1'"
  sudo pg_ctlcluster "$VERSION" "$CLUSTER" restart >&2
fi

# The password: the one in ~/.pgpass, else a new one. Set on the role every time (from stdin, so
# no command line shows it), so the role and ~/.pgpass always agree.
umask 077
PASSWORD=""
if [ -f "$PGPASS" ]; then
  PASSWORD="$(awk -F: -v db="$DB" '$1 == "127.0.0.1" && $3 == db && $4 == db {print $5}' "$PGPASS" | tail -n 1)"
fi
if [ -z "$PASSWORD" ]; then
  PASSWORD="$(openssl rand -hex 24)"
fi
{ grep -v "^127\.0\.0\.1:[0-9]*:$DB:$DB:" "$PGPASS" 2>/dev/null || true; echo "127.0.0.1:$PORT:$DB:$DB:$PASSWORD"; } \
  > "$PGPASS.new"
mv "$PGPASS.new" "$PGPASS"
chmod 600 "$PGPASS"
if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB'")" ]; then
  psql_admin -c "CREATE ROLE $DB LOGIN"
fi
psql_admin <<< "ALTER ROLE $DB WITH LOGIN PASSWORD '$PASSWORD';"
if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
  as_postgres createdb --owner="$DB" "$DB"
fi

URI="postgresql+psycopg://$DB@127.0.0.1:$PORT/$DB"
echo "$URI" > "$STATE/backend-store-uri"
echo "$URI"
