#!/bin/sh
# initdb on first start (password auth over TCP), then run the server in the foreground.
set -eu
BIN=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
USER_NAME="${POSTGRES_USER:-postgres}"
DB_NAME="${POSTGRES_DB:-$USER_NAME}"
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}" > /tmp/pwfile
    chown postgres /tmp/pwfile
    su postgres -s /bin/sh -c "$BIN/initdb -D '$PGDATA' -U '$USER_NAME' --pwfile=/tmp/pwfile \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8" >/dev/null
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$DB_NAME" != "postgres" ]; then
        echo "CREATE DATABASE \"$DB_NAME\" OWNER \"$USER_NAME\"" | \
            su postgres -s /bin/sh -c "$BIN/postgres --single -D '$PGDATA' postgres" >/dev/null
    fi
fi
exec su postgres -s /bin/sh -c "exec $BIN/postgres -D '$PGDATA' -c listen_addresses='*' \
    -c fsync=off -c full_page_writes=off -c max_connections=200 $*"
