#!/bin/sh
# PostgreSQL from Debian's package, standing in for the official image in
# the compose test (no registry here): same variables (POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB), same data path, password auth over TCP.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
data=/var/lib/postgresql/data
mkdir -p "$data" /var/run/postgresql
chown -R postgres:postgres "$data" /var/run/postgresql
chmod 700 "$data"
as_postgres() { setpriv --reuid postgres --regid postgres --init-groups "$@"; }
if [ ! -s "$data/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres "$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$data/pg_hba.conf"
  echo "CREATE DATABASE \"$POSTGRES_DB\";" |
    as_postgres "$bin/postgres" --single -D "$data" -j postgres >/dev/null
fi
exec setpriv --reuid postgres --regid postgres --init-groups \
  "$bin/postgres" -D "$data" -c listen_addresses='*'
