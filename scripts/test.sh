#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL and NATS on loopback,
# starting (or installing) them first. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh

# Databases left by an interrupted earlier run (tests drop their own).
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'flotilla\_test\_%'" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || true
  done

# The third-party gRPC client of the reflection tests (Python grpcio).
bash scripts/python-client.sh >/dev/null

cargo test --workspace --locked --no-fail-fast "$@"
