# Start a throw-away PostgreSQL server on 127.0.0.1 for the tests; sets MASK_SEARCH_PG_URL.
# Sourced by tools/test; also usable by hand: `source tools/postgres.sh; start_postgres`.
PG_PORT=${PG_PORT:-55432}
PG_DIR=${PG_DIR:-/tmp/mask-search-pg}

start_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  local as=""
  if [ "$(id -u)" = 0 ]; then as="runuser -u postgres --"; fi
  if [ "$(id -u)" = 0 ]; then mkdir -p "$PG_DIR"; chown postgres "$PG_DIR"; fi
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    $as "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust >/dev/null
  fi
  # Already running (a second `start_postgres`, or a test fixture after .ci/run): keep it.
  if ! $as "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    $as "$bin/pg_ctl" -D "$PG_DIR/data" -o "-h 127.0.0.1 -p $PG_PORT -k /tmp" -l "$PG_DIR/log" -w start >/dev/null || return 1
  fi
  MASK_SEARCH_PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
  export MASK_SEARCH_PG_URL
  echo "PostgreSQL at $MASK_SEARCH_PG_URL"
}

stop_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  local as=""
  if [ "$(id -u)" = 0 ]; then as="runuser -u postgres --"; fi
  $as "$bin/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
}

restart_postgres() {  # the reliability test: a server restart while workers are connected
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  local as=""
  if [ "$(id -u)" = 0 ]; then as="runuser -u postgres --"; fi
  $as "$bin/pg_ctl" -D "$PG_DIR/data" -o "-h 127.0.0.1 -p $PG_PORT -k /tmp" -l "$PG_DIR/log" \
    -m fast -w restart >/dev/null
}
