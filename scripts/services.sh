#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, trust auth for local tests) and
# nats-server with JetStream (127.0.0.1:4222) are installed and running.
# Uses servers that are already up; installs the Debian packages
# `postgresql` and `nats-server` when missing, and `prometheus` for the
# `promtool` the metrics test uses. Safe to run repeatedly.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_port() {
  for _ in $(seq 1 100); do
    port_open "$1" && return 0
    sleep 0.2
  done
  return 1
}

ensure_postgres() {
  if ! port_open 5432; then
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
      log "installing postgresql"
      apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
    if [ -z "$version" ]; then
      log "no PostgreSQL cluster found; creating one"
      version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
      as_root pg_createcluster "$version" main
    fi
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port 5432 || { log "PostgreSQL did not open 127.0.0.1:5432"; exit 1; }
  fi
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; then
    # A fresh Debian cluster asks for a password on TCP; tests use trust on loopback.
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -n1)
    if [ -n "$hba" ]; then
      log "enabling trust auth for 127.0.0.1 in $hba"
      as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
      as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
      sleep 1
    fi
    psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null \
      || { log "cannot connect to PostgreSQL as postgres@127.0.0.1"; exit 1; }
  fi
  log "PostgreSQL ready on 127.0.0.1:5432"
}

ensure_nats() {
  if ! port_open 4222; then
    if ! command -v nats-server >/dev/null 2>&1; then
      log "installing nats-server"
      apt_install nats-server
    fi
    local dir="${NATS_STORE_DIR:-/var/lib/nats-server}"
    as_root mkdir -p "$dir"
    log "starting nats-server -js (store $dir)"
    as_root start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
      -a 127.0.0.1 -p 4222 -js -sd "$dir" -l /var/log/nats-server.log
    wait_port 4222 || { log "nats-server did not open 127.0.0.1:4222"; exit 1; }
  fi
  log "NATS ready on 127.0.0.1:4222"
}

command -v psql >/dev/null 2>&1 || apt_install postgresql-client
# promtool (Debian ships it in `prometheus`) lints what /metrics serves.
if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool (package prometheus)"
  apt_install --no-install-recommends prometheus
fi
ensure_postgres
ensure_nats
