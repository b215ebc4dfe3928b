#!/usr/bin/env bash
# Stop the services infra/native/start.sh started for STATE (pid files and the Postgres data
# folder); nothing else is signalled. Data stays in STATE; start.sh brings it back.
#   infra/native/stop.sh [STATE]       (default $ADAPTERFLOW_INFRA_DIR or .adapterflow/infra)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GRACE=${ADAPTERFLOW_STOP_TIMEOUT:-20}  # seconds before SIGKILL
WEED_GRACE=3  # weed ignores SIGTERM and SIGINT here: it gets a moment to flush, then SIGKILL

main() {
    [ -d "${1:-${ADAPTERFLOW_INFRA_DIR:-.adapterflow/infra}}" ] || { log "nothing to stop"; return 0; }
    resolve_state "${1:-}"
    stop_session prefect "$GRACE"
    stop_session mlflow "$GRACE"
    stop_session weed "$WEED_GRACE"
    remove_weed_sockets
    stop_postgres
    rm -f "$RUN/settings.env"
}

# The processes of the session start.sh created for NAME (its pid is the session id).
session_members() { ps -eo pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }'; }

stop_session() {
    local name=$1 grace=$2 pidfile=$RUN/$1.pid pid members
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # A pid that is no longer a session leader was reused by someone else: leave it alone.
    if [ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" != "$pid" ]; then
        rm -f "$pidfile"
        return 0
    fi
    members=$(session_members "$pid")
    # shellcheck disable=SC2086
    kill -TERM $members 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while [ -n "$(session_members "$pid")" ] && ((SECONDS < deadline)); do sleep 0.5; done
    members=$(session_members "$pid")
    # shellcheck disable=SC2086
    [ -z "$members" ] || kill -KILL $members 2>/dev/null || true
    while [ -n "$(session_members "$pid")" ]; do sleep 0.2; done
    rm -f "$pidfile"
    log "$name stopped"
}

# The unix sockets weed leaves in /tmp, as start.sh listed them.
remove_weed_sockets() {
    [ -f "$RUN/weed.sockets" ] || return 0
    xargs rm -f <"$RUN/weed.sockets"
    rm -f "$RUN/weed.sockets"
}

stop_postgres() {
    [ -f "$PGDATA/PG_VERSION" ] || return 0
    resolve_pg_bin
    PG_OS_USER=$(stat -c %U "$PGDATA")
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1 || return 0
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t "$GRACE" stop >/dev/null
    log "postgres stopped"
}

main "$@"
