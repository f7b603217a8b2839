#!/usr/bin/env bash
# The chaos suite at full size, in one command: builds the service binaries
# and runs `flotilla-chaos`, which starts its own PostgreSQL and NATS
# (never the shared ones), every service as a process, the storm, the
# kills and restarts, and checks the invariants. Exit status 0 = passed.
#
#   scripts/chaos.sh                       # 2000 instances over 300 s, 1 NATS node
#   scripts/chaos.sh --cluster             # the same on a 3-node NATS cluster
#   scripts/chaos.sh --size 500 --duration 60 --keep
#
# Arguments go to flotilla-chaos (`--help` lists them). CHAOS_PROFILE=release
# builds optimised binaries (slower to build, faster to run).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in nats-server initdb pg_ctl; do
  if ! command -v "$tool" >/dev/null && ! ls /usr/sbin/"$tool" /usr/lib/postgresql/*/bin/"$tool" >/dev/null 2>&1; then
    echo "chaos: $tool not found; install PostgreSQL and nats-server (scripts/services.sh does)" >&2
    exit 1
  fi
done

profile=${CHAOS_PROFILE:-dev}
if [ "$profile" = release ]; then dir=release; else dir=debug; fi
cargo build --locked --profile "$profile" --bins \
  -p flotilla-api -p flotilla-scheduler -p flotilla-terminator -p flotilla-watchdog \
  -p flotilla-provider-adapter -p flotilla-sim-provider -p flotilla-chaos

target=${CARGO_TARGET_DIR:-target}
exec "$target/$dir/flotilla-chaos" "$@"
