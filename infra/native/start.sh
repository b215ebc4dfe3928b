#!/usr/bin/env bash
# Start Postgres, SeaweedFS (S3), an MLflow server and a Prefect server on loopback, without a
# container engine, and write STATE/env.sh for clients. Both servers require a login: MLflow with
# adapterflow's auth app, basic-auth plus MANAGE to move @production (users in the Postgres database
# mlflow_auth; the admin's credentials in STATE/admin.env), Prefect with an auth string (PREFECT_API_AUTH_STRING in env.sh).
#   infra/native/start.sh [STATE]       (default $ADAPTERFLOW_INFRA_DIR or .adapterflow/infra)
#   source STATE/env.sh
#   (source STATE/admin.env; adapterflow infra users MODEL --out FILE)   # once: the trainer and the promoter
#   export MLFLOW_TRACKING_USERNAME=trainer MLFLOW_TRACKING_PASSWORD=...; adapterflow run config.yaml
#   infra/native/stop.sh [STATE]
# Ports (defaults): ADAPTERFLOW_PG_PORT 5432, ADAPTERFLOW_S3_PORT 8333, ADAPTERFLOW_MLFLOW_PORT 5000,
# ADAPTERFLOW_PREFECT_PORT 4200; SeaweedFS' internal ones: ADAPTERFLOW_WEED_{MASTER,VOLUME,FILER}_PORT
# 9333/8080/8888 and ADAPTERFLOW_WEED_*_GRPC_PORT (each port + 10000, S3 included).
# Bucket: ADAPTERFLOW_S3_BUCKET (adapterflow). Services already running for STATE are kept, on their ports.
# Aliases only MANAGE may move: ADAPTERFLOW_PROTECTED_ALIASES (production; comma-separated), read when MLflow starts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TIMEOUT=${ADAPTERFLOW_START_TIMEOUT:-240}  # seconds per service; a first Prefect migration is slow on 2 cores
HOST=127.0.0.1
MLFLOW_ADMIN_USER=admin

# Ports and bucket from the environment, unless services of STATE run already: then theirs.
settings() {
    PG_PORT=${ADAPTERFLOW_PG_PORT:-5432}
    S3_PORT=${ADAPTERFLOW_S3_PORT:-8333}
    MLFLOW_PORT=${ADAPTERFLOW_MLFLOW_PORT:-5000}
    PREFECT_PORT=${ADAPTERFLOW_PREFECT_PORT:-4200}
    MASTER_PORT=${ADAPTERFLOW_WEED_MASTER_PORT:-9333}
    VOLUME_PORT=${ADAPTERFLOW_WEED_VOLUME_PORT:-8080}
    FILER_PORT=${ADAPTERFLOW_WEED_FILER_PORT:-8888}
    MASTER_GRPC=${ADAPTERFLOW_WEED_MASTER_GRPC_PORT:-$((MASTER_PORT + 10000))}
    VOLUME_GRPC=${ADAPTERFLOW_WEED_VOLUME_GRPC_PORT:-$((VOLUME_PORT + 10000))}
    FILER_GRPC=${ADAPTERFLOW_WEED_FILER_GRPC_PORT:-$((FILER_PORT + 10000))}
    S3_GRPC=${ADAPTERFLOW_WEED_S3_GRPC_PORT:-$((S3_PORT + 10000))}
    BUCKET=${ADAPTERFLOW_S3_BUCKET:-adapterflow}
    if [ -f "$RUN/settings.env" ]; then
        log "reusing the ports of the running services ($RUN/settings.env; stop.sh clears them)"
        # shellcheck disable=SC1091
        source "$RUN/settings.env"
    else
        declare -p PG_PORT S3_PORT MLFLOW_PORT PREFECT_PORT MASTER_PORT VOLUME_PORT FILER_PORT \
            MASTER_GRPC VOLUME_GRPC FILER_GRPC S3_GRPC BUCKET | sed 's/^declare -- //' >"$RUN/settings.env"
    fi
    S3_URL=http://$HOST:$S3_PORT
    MLFLOW_URL=http://$HOST:$MLFLOW_PORT
    PREFECT_API=http://$HOST:$PREFECT_PORT/api
}

main() {
    resolve_state "${1:-}"
    resolve_tools
    resolve_pg_bin
    trap on_exit EXIT
    settings
    load_secrets
    if ! pid_alive "$RUN/weed.pid"; then check_free "$S3_PORT" "$MASTER_PORT" "$VOLUME_PORT" "$FILER_PORT" \
        "$MASTER_GRPC" "$VOLUME_GRPC" "$FILER_GRPC" "$S3_GRPC"; start_weed; fi
    start_postgres
    create_databases
    # The servers need S3 only per request: they boot while weed does.
    pid_alive "$RUN/mlflow.pid" || { check_free "$MLFLOW_PORT"; start_mlflow; }
    pid_alive "$RUN/prefect.pid" || { check_free "$PREFECT_PORT"; start_prefect; }
    wait_http weed "$S3_URL/healthz"
    create_bucket
    wait_http mlflow "$MLFLOW_URL/health"
    wait_http prefect "$PREFECT_API/health"
    write_env_file
    STARTED=1
    log "all services up; use them with: source $STATE/env.sh"
    log "  MLflow $MLFLOW_URL  Prefect ${PREFECT_API%/api}  S3 $S3_URL (bucket $BUCKET)  Postgres $HOST:$PG_PORT"
}

# A half-started set of services is stopped again, so a failure leaves nothing running.
STARTED=0
on_exit() {
    local status=$?
    if [ "$STARTED" = 0 ]; then
        log "start failed; stopping what was started (logs in $LOGS)"
        "$NATIVE_DIR/stop.sh" "$STATE" || true
    fi
    exit "$status"
}

# Credentials are made once per state folder and reused, so the stored data stays readable; a key
# missing from an older state folder's file is added. MLFLOW_ADMIN_PASSWORD creates MLflow's admin on
# the first start against an empty user store; MLFLOW_SECRET_KEY signs MLflow's CSRF tokens.
load_secrets() {
    local file=$STATE/secrets.env
    (umask 077; touch "$file"; "$PY" - "$file" <<'EOF'
import secrets, sys
path = sys.argv[1]
with open(path) as handle:
    have = {line.split("=", 1)[0] for line in handle if "=" in line}
new = {
    "PG_PASSWORD": secrets.token_hex(16), "S3_ACCESS_KEY": secrets.token_hex(16), "S3_SECRET_KEY": secrets.token_hex(16),
    "MLFLOW_ADMIN_PASSWORD": secrets.token_hex(16), "MLFLOW_SECRET_KEY": secrets.token_hex(32),
    "PREFECT_AUTH_STRING": "adapterflow:" + secrets.token_hex(16),
}
with open(path, "a") as handle:
    handle.writelines(f"{key}={value}\n" for key, value in new.items() if key not in have)
EOF
    )
    # shellcheck disable=SC1090
    source "$file"
}

check_free() {
    "$PY" - "$@" <<'EOF' || die "port(s) in use on 127.0.0.1 (see above); choose others with the ADAPTERFLOW_*_PORT variables"
import socket, sys
busy = []
for port in sys.argv[1:]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not busy
        try:
            sock.bind(("127.0.0.1", int(port)))
        except OSError:
            busy.append(port)
if busy:
    print("[infra] busy: " + " ".join(busy), file=sys.stderr)
    sys.exit(1)
EOF
}

# Runs a server in its own session: stop.sh signals the whole session and nothing else.
start_detached() {
    local name=$1; shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
    disown
}

wait_http() {
    local name=$1 url=$2 deadline=$((SECONDS + TIMEOUT))
    until "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3).close()' "$url" 2>/dev/null; do
        if ! pid_alive "$RUN/$name.pid"; then
            tail -n 20 "$LOGS/$name.log" >&2 || true
            die "$name exited during start-up (log: $LOGS/$name.log)"
        fi
        ((SECONDS < deadline)) || die "$name not healthy at $url after ${TIMEOUT}s (log: $LOGS/$name.log)"
        sleep 1
    done
    log "$name healthy ($url)"
}

start_weed() {
    mkdir -p "$STATE/weed/data"
    (umask 077; cat >"$STATE/weed/s3.json" <<EOF
{"identities": [{"name": "adapterflow",
  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
    )
    # weed leaves unix sockets in /tmp, named after its ports: stop.sh removes these.
    printf '/tmp/seaweedfs-%s.sock\n' "master-grpc-$MASTER_GRPC" "volume-grpc-$VOLUME_GRPC" "filer-$FILER_PORT" \
        "filer-grpc-$FILER_GRPC" "s3-$S3_PORT" "s3-grpc-$S3_GRPC" >"$RUN/weed.sockets"
    # Iceberg and Lance catalogs off: they would take two more fixed ports. One master needs no
    # 10 s election wait; the volume server's 10 s pre-stop delay only serves a cluster.
    start_detached weed "$WEED" server -dir="$STATE/weed/data" -ip="$HOST" -ip.bind="$HOST" \
        -master.port="$MASTER_PORT" -master.port.grpc="$MASTER_GRPC" -master.volumeSizeLimitMB=1024 \
        -master.electionTimeout=1s -master.telemetry=false \
        -volume.port="$VOLUME_PORT" -volume.port.grpc="$VOLUME_GRPC" -volume.max=0 -volume.preStopSeconds=0 \
        -filer.port="$FILER_PORT" -filer.port.grpc="$FILER_GRPC" \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc="$S3_GRPC" -s3.config="$STATE/weed/s3.json" \
        -s3.port.iceberg=0 -s3.port.lance=0
    log "weed started (S3 on $S3_URL)"
}

# Root: Postgres runs as a system user (postgres, created if missing) that owns STATE/pg.
pick_pg_user() {
    mkdir -p "$PGDIR"
    chmod 700 "$PGDIR"
    PG_OS_USER=$(id -un)
    [ "$(id -u)" = 0 ] || return 0
    PG_OS_USER=${ADAPTERFLOW_PG_OS_USER:-postgres}
    id -u "$PG_OS_USER" >/dev/null 2>&1 ||
        useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_OS_USER"
    chown "$PG_OS_USER:" "$PGDIR"
    runuser -u "$PG_OS_USER" -- test -w "$PGDIR" ||
        die "user $PG_OS_USER cannot reach $PGDIR: every parent folder must be traversable (o+x); choose another state folder"
}

init_postgres() {
    [ -f "$PGDATA/PG_VERSION" ] && return 0
    local pwfile=$PGDIR/initdb.pw
    (umask 077; echo "$PG_PASSWORD" >"$pwfile")
    [ "$(id -u)" != 0 ] || chown "$PG_OS_USER:" "$pwfile"
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 --no-locale >"$LOGS/initdb.log"
    rm -f "$pwfile"
    # TCP on loopback only, no unix socket (its default folder /var/run/postgresql may not be ours).
    printf "listen_addresses = '%s'\nunix_socket_directories = ''\n" "$HOST" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
    log "postgres cluster initialized in $PGDATA"
}

start_postgres() {
    pick_pg_user
    init_postgres
    if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        log "postgres already running"
        return 0
    fi
    check_free "$PG_PORT"
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDIR/postgres.log" -o "-p $PG_PORT" -w -t "$TIMEOUT" start >/dev/null ||
        die "postgres did not start (log: $PGDIR/postgres.log)"
    "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" || die "postgres does not answer on $HOST:$PG_PORT"
    log "postgres healthy ($HOST:$PG_PORT)"
}

psql_admin() {
    PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres -tA "$@"
}

create_databases() {
    local db
    for db in mlflow mlflow_auth prefect; do
        [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" = 1 ] || psql_admin -c "CREATE DATABASE $db"
    done
}

# Through boto3, so the credentials are proven to work before anything depends on them.
create_bucket() {
    AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY "$PY" - "$S3_URL" "$BUCKET" "$TIMEOUT" <<'EOF'
import sys, time
import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

url, bucket, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
deadline = time.monotonic() + timeout
while True:
    try:
        if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=bucket)
        s3.head_bucket(Bucket=bucket)
        break
    except (ClientError, EndpointConnectionError) as err:  # the filer may still be starting
        if time.monotonic() > deadline:
            sys.exit(f"[infra] error: cannot create bucket {bucket} at {url}: {err}")
        time.sleep(1)
EOF
    log "bucket s3://$BUCKET ready"
}

s3_env() {
    echo AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_DEFAULT_REGION=us-east-1 \
        AWS_ENDPOINT_URL="$S3_URL" MLFLOW_S3_ENDPOINT_URL="$S3_URL"
}

# Artifacts are proxied (--serve-artifacts is the default): clients need no S3 credentials.
# adapterflow-auth (tasks/auth_app.py): MLflow's basic-auth app, where every request but /health needs a
# user; users may read everything (default_permission READ) and create experiments and models; writing
# to a registered model someone else created needs a grant (adapterflow infra users); and moving
# @production (ADAPTERFLOW_PROTECTED_ALIASES) needs MANAGE on the model. Passwords and keys go by environment.
start_mlflow() {
    write_auth_config
    # Job execution (GenAI features adapterflow does not use) would add 8 worker processes.
    # shellcheck disable=SC2046
    start_detached mlflow env $(s3_env) PGPASSWORD="$PG_PASSWORD" MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
        MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD" \
        MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY" \
        "$MLFLOW" server --app-name adapterflow-auth --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "postgresql://$DB_USER@$HOST:$PG_PORT/mlflow" \
        --artifacts-destination "s3://$BUCKET/mlflow"
    log "mlflow started (adapterflow-auth: basic-auth + MANAGE for @production; the admin's credentials in $STATE/admin.env)"
}

# MLflow's auth settings; no secret in them (libpq reads PGPASSWORD, the admin password comes by environment).
write_auth_config() {
    mkdir -p "$STATE/mlflow"
    cat >"$STATE/mlflow/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql://$DB_USER@$HOST:$PG_PORT/mlflow_auth
admin_username = $MLFLOW_ADMIN_USER
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
}

# The connection URL (with its password) goes by environment, not on the command line.
start_prefect() {
    mkdir -p "$STATE/prefect"
    start_detached prefect env -u PREFECT_API_URL -u PREFECT_API_AUTH_STRING PREFECT_HOME="$STATE/prefect" \
        PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$DB_USER:$PG_PASSWORD@$HOST:$PG_PORT/prefect" \
        PREFECT_SERVER_API_AUTH_STRING="$PREFECT_AUTH_STRING" \
        PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
        "$PREFECT" server start --host "$HOST" --port "$PREFECT_PORT"
    log "prefect started"
}

write_env_file() {
    (umask 077; cat >"$STATE/env.sh" <<EOF
# Written by infra/native/start.sh for the services in $STATE; source it, then run adapterflow.
# In run configs: tracking.mlflow_uri: $MLFLOW_URL and tracking.dvc_remote: s3://$BUCKET/dvc
# MLflow also needs a user: MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD of one that
# adapterflow infra users made (the admin's, in admin.env, are for administration).
export PREFECT_API_URL=$PREFECT_API
export PREFECT_API_AUTH_STRING=$PREFECT_AUTH_STRING
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export ADAPTERFLOW_DVC_REMOTE=s3://$BUCKET/dvc
export ADAPTERFLOW_S3_BUCKET=$BUCKET
# S3 (SeaweedFS): AWS_ENDPOINT_URL serves boto3, s3fs and dvc-s3; MLflow reads its own variable.
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=$S3_URL
export MLFLOW_S3_ENDPOINT_URL=$S3_URL
export ADAPTERFLOW_POSTGRES_URL=postgresql://$DB_USER:$PG_PASSWORD@$HOST:$PG_PORT
export ADAPTERFLOW_INFRA_DIR=$STATE
EOF
    cat >"$STATE/admin.env" <<EOF
# Written by infra/native/start.sh: the MLflow admin of the services in $STATE, for administration
# only (adapterflow infra users); runs and promotions use the users it creates.
export MLFLOW_TRACKING_USERNAME=$MLFLOW_ADMIN_USER
export MLFLOW_TRACKING_PASSWORD=$MLFLOW_ADMIN_PASSWORD
EOF
    )
}

main "$@"
