# Shared by start.sh and stop.sh (sourced, not run): where the state lives, which tools to use.
# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are read by the scripts that source this file.)

NATIVE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$NATIVE_DIR/../.." && pwd)
DB_USER=adapterflow  # the Postgres role that owns both databases

log() { printf '[infra] %s\n' "$*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

# STATE: argument, else $ADAPTERFLOW_INFRA_DIR, else .adapterflow/infra under the current directory.
resolve_state() {
    STATE=${1:-${ADAPTERFLOW_INFRA_DIR:-.adapterflow/infra}}
    mkdir -p "$STATE"
    STATE=$(cd "$STATE" && pwd)
    RUN=$STATE/run LOGS=$STATE/logs PGDIR=$STATE/pg PGDATA=$STATE/pg/data
    mkdir -p "$RUN" "$LOGS"
}

# The project's venv when there is one (mlflow, prefect, weed, boto3 live there), else PATH.
resolve_tools() {
    PY=${ADAPTERFLOW_PYTHON:-$REPO_DIR/.venv/bin/python}
    [ -x "$PY" ] || PY=$(command -v python3) || die "no python: set ADAPTERFLOW_PYTHON"
    local bin; bin=$(dirname "$PY")
    MLFLOW=$(tool "$bin" mlflow) PREFECT=$(tool "$bin" prefect) WEED=$(tool "$bin" weed)
}

tool() { if [ -x "$1/$2" ]; then echo "$1/$2"; else command -v "$2" || echo "$2"; fi; }

# Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
resolve_pg_bin() {
    PG_BIN=${ADAPTERFLOW_PG_BIN:-}
    if [ -z "$PG_BIN" ]; then
        if command -v initdb >/dev/null; then
            PG_BIN=$(dirname "$(readlink -f "$(command -v initdb)")")  # past /usr/local/bin links, to psql
        else
            PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)  # the newest major
        fi
    fi
    [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] ||
        die "Postgres server binaries (initdb, pg_ctl) not found; install them with infra/native/system-packages.sh (Debian package postgresql) or set ADAPTERFLOW_PG_BIN" 3
}

# Postgres refuses to run as root: as root, run its tools as the owner of the data folder.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$PG_OS_USER" -- "$@"
    else
        "$@"
    fi
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
