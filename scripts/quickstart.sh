#!/usr/bin/env bash
# The whole Flotilla system on this machine, without Docker:
#
#   scripts/quickstart.sh            start (foreground; Ctrl-C terminates the fleet, stops everything)
#   scripts/quickstart.sh status     where things are, if it is running
#   scripts/quickstart.sh stop       stop a running quickstart from another shell
#   scripts/quickstart.sh restart    stop it, then start again
#
# Makes sure PostgreSQL and nats-server -js run (scripts/services.sh: uses
# running ones, starts installed ones, installs them on Debian/Ubuntu),
# builds the binaries, starts api (which applies the migrations), scheduler,
# terminator, watchdog and provider-adapter with the `local` provider,
# creates a demo pool and provisions a few real `agent` processes.
#
# All state lives under $QUICKSTART_DATA_DIR (default .flotilla/): logs/,
# run/ (pid files), local/ (the local provider's machines, their logs),
# token, env (source it to use the CLI). Running it again while it runs
# shows the running one; after an unclean end (kill -9) it stops what was
# left and starts afresh, adopting the agents that still run.
#
# Settings (environment):
#   QUICKSTART_DATA_DIR        state directory                 (.flotilla)
#   QUICKSTART_DATABASE        PostgreSQL database name        (flotilla_quickstart)
#   QUICKSTART_NATS_NAMESPACE  NATS stream/subject prefix      (quickstart)
#   QUICKSTART_API_PORT        gRPC api port                   (50051)
#   QUICKSTART_ADAPTER_PORT    provider-adapter gRPC port      (50061)
#   QUICKSTART_METRICS_PORT    first of 5 /metrics ports       (9101)
#   QUICKSTART_POOL            demo pool name                  (demo)
#   QUICKSTART_AGENTS          agents kept in the demo pool at start (3)
#   QUICKSTART_PROFILE         cargo profile: debug or release (debug)
#   QUICKSTART_BUILD           0 to skip `cargo build`         (1)
#   QUICKSTART_SERVICES        0 to skip scripts/services.sh   (1)
#   QUICKSTART_STOP_TIMEOUT    seconds to wait for the fleet to terminate on stop (60)
# Any service variable (docs/configuration.md) set in the environment wins
# over the demo tuning below (fast heartbeats, short drains), except those
# set from QUICKSTART_* (API_LISTEN, API_TOKENS, PROVIDER_ADAPTER_LISTEN,
# PROVIDER_ADAPTER_TOKENS, PROVIDER_ADAPTER_URL, PROVIDER_ADAPTER_TOKEN_FILE,
# METRICS_ADDR, DATABASE_URL, NATS_NAMESPACE, LOCAL_PROVIDER_ENABLED,
# LOCAL_STATE_DIR, WORKER_API_URL). AGENT_* never reach the agents: the
# local provider passes a machine none of this environment.
#
# Security: every service listens on 127.0.0.1 only and speaks plaintext
# gRPC there (loopback never leaves this machine; agents and the CLI refuse
# plaintext to any other address). The provider-adapter still requires a
# service token from its callers. Every file written here is owner-only
# (umask 077): the API token, the service token and the env file.
set -euo pipefail
umask 077

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cmd=${1:-start}

DATA_DIR=${QUICKSTART_DATA_DIR:-$repo/.flotilla}
DB_NAME=${QUICKSTART_DATABASE:-flotilla_quickstart}
NATS_NS=${QUICKSTART_NATS_NAMESPACE-quickstart}
API_PORT=${QUICKSTART_API_PORT:-50051}
ADAPTER_PORT=${QUICKSTART_ADAPTER_PORT:-50061}
METRICS_PORT=${QUICKSTART_METRICS_PORT:-9101}
POOL=${QUICKSTART_POOL:-demo}
AGENTS=${QUICKSTART_AGENTS:-3}
PROFILE=${QUICKSTART_PROFILE:-debug}
STOP_TIMEOUT=${QUICKSTART_STOP_TIMEOUT:-60}
PG_ADMIN=(psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq)

# Services in start order; stopped in reverse (scheduler first, see shutdown).
SERVICES=(provider-adapter api scheduler terminator watchdog)

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
LOGS=$DATA_DIR/logs
RUN=$DATA_DIR/run
LOCAL=$DATA_DIR/local
TARGET=${CARGO_TARGET_DIR:-$repo/target}
case "$PROFILE" in
  debug) BIN=$TARGET/debug; build_flags=() ;;
  release) BIN=$TARGET/release; build_flags=(--release) ;;
  *) echo "QUICKSTART_PROFILE must be debug or release, not $PROFILE" >&2; exit 2 ;;
esac
API_URL=http://127.0.0.1:$API_PORT

log() { printf '[quickstart] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $DB_NAME =~ ^[a-z_][a-z0-9_]*$ ]] || die "QUICKSTART_DATABASE must match [a-z_][a-z0-9_]*"
[[ $NATS_NS =~ ^[A-Za-z0-9_]*$ ]] || die "QUICKSTART_NATS_NAMESPACE: letters, digits and _ only"
for p in "$API_PORT" "$ADAPTER_PORT" "$METRICS_PORT"; do
  [[ $p =~ ^[0-9]+$ ]] || die "ports must be numbers, got $p"
done

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

metrics_port() { # service -> its /metrics port
  local i
  for i in "${!SERVICES[@]}"; do
    [ "${SERVICES[$i]}" = "$1" ] && { echo $((METRICS_PORT + i)); return; }
  done
}

# A pid from a pid file, if that process still runs the expected binary
# (a recycled pid is never signalled).
live_pid() { # pidfile, a string its command line contains
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1
  echo "$pid"
}

supervisor_pid() { live_pid "$RUN/quickstart.pid" quickstart.sh; }

flotilla() {
  FLOTILLA_API_URL=$API_URL FLOTILLA_API_TOKEN=$TOKEN "$BIN/flotilla" "$@"
}

# Kills every agent process the local provider knows of (each leads its
# own process group).
kill_agents() {
  local pid
  [ -f "$LOCAL/machines.json" ] || return 0
  grep -o '"pid": *[0-9]*' "$LOCAL/machines.json" | grep -o '[0-9]*$' | while read -r pid; do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q agent; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done || true
}

# SIGTERM to each service (graceful shutdown), SIGKILL after the grace.
stop_services() { # services...
  local name pid
  for name in "$@"; do
    if pid=$(live_pid "$RUN/$name.pid" "/$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop in 10s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$RUN/$name.pid"
  done
}

# What still runs, from the pid files and the local provider's book:
# "api (pid 12), scheduler (pid 13), 2 agents"; empty when nothing does.
still_running() {
  local name pid out=() agents=0
  for name in "${SERVICES[@]}"; do
    if pid=$(live_pid "$RUN/$name.pid" "/$name"); then
      out+=("$name (pid $pid)")
    fi
  done
  if [ -f "$LOCAL/machines.json" ]; then
    for pid in $(grep -o '"pid": *[0-9]*' "$LOCAL/machines.json" | grep -o '[0-9]*$'); do
      tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q agent && agents=$((agents + 1))
    done
  fi
  [ "$agents" -gt 0 ] && out+=("$agents agent$([ "$agents" = 1 ] || echo s)")
  local IFS=,
  echo "${out[*]}" | sed 's/,/, /g'
}

status() {
  local left
  if pid=$(supervisor_pid); then
    cat "$DATA_DIR/status.txt" 2>/dev/null || true
    log "running (pid $pid)"
    return 0
  fi
  left=$(still_running)
  if [ -n "$left" ]; then
    # The supervisor was killed (kill -9?) and left these behind.
    log "the quickstart supervisor is not running, but these still run: $left"
    log "stop them with: $0 stop (or start it again: $0, which adopts the agents)"
    return 1
  fi
  log "not running"
  return 1
}

stop_running() {
  local pid waited=0 left last=
  if pid=$(supervisor_pid); then
    log "stopping the quickstart running as pid $pid (up to $((STOP_TIMEOUT + 90))s: the fleet is terminated first)"
    kill -TERM "$pid"
    # The lock is released when the supervisor has stopped everything;
    # until then, say what it is still waiting for whenever that changes
    # (and every 10 s).
    exec 8>"$DATA_DIR/quickstart.lock"
    until flock -n 8; do
      if [ "$waited" -ge $((STOP_TIMEOUT + 90)) ]; then
        die "pid $pid did not stop in $((STOP_TIMEOUT + 90))s; kill it and run stop again"
      fi
      left=$(still_running)
      if [ "$left" != "$last" ] || [ $((waited % 10)) = 0 ]; then
        log "waiting (${waited}s): ${left:-only the supervisor} still running"
        last=$left
      fi
      sleep 1
      waited=$((waited + 1))
    done
    exec 8>&-
    log "stopped"
  else
    # No supervisor: whatever an unclean end left behind.
    stop_services watchdog terminator scheduler api provider-adapter
    kill_agents
    rm -f "$RUN/quickstart.pid"
    log "nothing running"
  fi
}

case "$cmd" in
  start) ;;
  status) status; exit $? ;;
  stop) stop_running; exit 0 ;;
  restart) stop_running ;;
  -h|--help|help) sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown command $cmd (start, status, stop, restart)" ;;
esac

for tool in flock setsid sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is required (Debian: util-linux / coreutils)"
done

# One quickstart per data dir: the lock is held for the supervisor's life.
exec 9>"$DATA_DIR/quickstart.lock"
if ! flock -n 9; then
  log "a quickstart is already running with $DATA_DIR; showing it (stop it with: $0 stop, or Ctrl-C in its terminal)"
  cat "$DATA_DIR/status.txt" 2>/dev/null || true
  exit 0
fi
mkdir -p "$LOGS" "$RUN" "$LOCAL" "$DATA_DIR/bin"
echo $$ >"$RUN/quickstart.pid"
# An unclean earlier end (kill -9) may have left services running.
stop_services watchdog terminator scheduler api provider-adapter

stopping=0
started=0
shutdown() {
  local code=$1
  [ "$stopping" = 1 ] && return
  stopping=1
  # A second Ctrl-C skips the orderly part.
  trap 'log "stopping now"; stop_services "${SERVICES[@]}"; kill_agents; rm -f "$RUN/quickstart.pid"; exit 130' INT TERM
  if [ "$started" = 1 ]; then
    log "stopping (Ctrl-C again to skip the orderly shutdown)"
    # The scheduler goes first so pool capacity does not replace what is
    # being terminated; the terminator then removes every instance.
    stop_services scheduler
    if live_pid "$RUN/api.pid" /api >/dev/null && live_pid "$RUN/terminator.pid" /terminator >/dev/null; then
      local pool
      for pool in $(flotilla pools list -o ids 2>/dev/null); do
        log "terminating the instances of pool $pool"
        flotilla terminate --pool "$pool" --force --reason "quickstart stopped" \
          --wait --wait-timeout "$STOP_TIMEOUT" -o ids >/dev/null || log "pool $pool: not every instance terminated in time"
      done
    fi
  fi
  stop_services watchdog terminator scheduler api provider-adapter
  kill_agents
  rm -f "$RUN/quickstart.pid" "$DATA_DIR/status.txt"
  log "stopped"
  exit "$code"
}
trap 'shutdown 130' INT
trap 'shutdown 143' TERM
trap 'shutdown $?' EXIT

if [ "${QUICKSTART_SERVICES:-1}" != 0 ]; then
  "$repo/scripts/services.sh"
fi
command -v psql >/dev/null || die "psql is required (scripts/services.sh installs postgresql-client)"

if [ "${QUICKSTART_BUILD:-1}" != 0 ]; then
  log "building ($PROFILE; the first build takes several minutes)"
  (cd "$repo" && "${CARGO:-cargo}" build "${build_flags[@]}" --bins \
    -p flotilla-api -p flotilla-scheduler -p flotilla-terminator -p flotilla-watchdog \
    -p flotilla-provider-adapter -p flotilla-agent -p flotilla-cli)
fi
for b in "${SERVICES[@]}" agent flotilla; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing: build with QUICKSTART_BUILD=1"
done
ln -sf "$BIN/flotilla" "$DATA_DIR/bin/flotilla"

for f in token service-token; do
  if [ ! -s "$DATA_DIR/$f" ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DATA_DIR/$f"
  fi
done
# Files of an earlier quickstart may predate the umask.
chmod 600 "$DATA_DIR/token" "$DATA_DIR/service-token"
chmod 700 "$DATA_DIR"
TOKEN=$(cat "$DATA_DIR/token")
token_hash=$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)
service_hash=$(printf %s "$(cat "$DATA_DIR/service-token")" | sha256sum | cut -d' ' -f1)

if [ "$("${PG_ADMIN[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
  log "creating database $DB_NAME"
  "${PG_ADMIN[@]}" -c "CREATE DATABASE $DB_NAME" >/dev/null
fi

for p in "$API_PORT" "$ADAPTER_PORT" $(seq "$METRICS_PORT" $((METRICS_PORT + ${#SERVICES[@]} - 1))); do
  port_open "$p" && die "port $p is in use; choose others with QUICKSTART_API_PORT, QUICKSTART_ADAPTER_PORT, QUICKSTART_METRICS_PORT"
done

# What every service shares, then the demo tuning (the environment wins).
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB_NAME
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export NATS_NAMESPACE=$NATS_NS
export NO_COLOR=1
export SHUTDOWN_GRACE_SECONDS=${SHUTDOWN_GRACE_SECONDS:-5}
export PROVIDER_ADAPTER_URL=http://127.0.0.1:$ADAPTER_PORT
# The adapter serves only holders of the service token; its callers read it
# from the file (never from the command line, where ps would show it).
export PROVIDER_ADAPTER_TOKEN_FILE=$DATA_DIR/service-token
export WORKER_HEARTBEAT_INTERVAL_MS=${WORKER_HEARTBEAT_INTERVAL_MS:-1000}
export WORKER_HEARTBEAT_TIMEOUT_SECONDS=${WORKER_HEARTBEAT_TIMEOUT_SECONDS:-4}
export WATCHDOG_TICK_MS=${WATCHDOG_TICK_MS:-500}
export SCHEDULER_TICK_MS=${SCHEDULER_TICK_MS:-500}
export TERMINATOR_TICK_MS=${TERMINATOR_TICK_MS:-500}
export TERMINATOR_POLL_MS=${TERMINATOR_POLL_MS:-500}
export DRAIN_TIMEOUT_SECONDS=${DRAIN_TIMEOUT_SECONDS:-5}
export STOP_GRACE_SECONDS=${STOP_GRACE_SECONDS:-2}

start_service() { # name, then extra VAR=value settings
  local name=$1
  shift
  : >"$LOGS/$name.log"
  # setsid: a Ctrl-C in the terminal reaches this script only, which then
  # stops the services in order. 9>&-: the services must not hold the lock.
  env "$@" METRICS_ADDR="127.0.0.1:$(metrics_port "$name")" \
    setsid "$BIN/$name" >>"$LOGS/$name.log" 2>&1 9>&- </dev/null &
  echo $! >"$RUN/$name.pid"
}

wait_listening() { # name port
  local i
  for i in $(seq 1 600); do
    port_open "$2" && return 0
    live_pid "$RUN/$1.pid" "/$1" >/dev/null || { tail -n 30 "$LOGS/$1.log" >&2; die "$1 exited (log: $LOGS/$1.log)"; }
    sleep 0.1
  done
  tail -n 30 "$LOGS/$1.log" >&2
  die "$1 did not listen on port $2 within 60s (log: $LOGS/$1.log)"
}

started=1
log "starting services (logs in $LOGS)"
start_service provider-adapter PROVIDER_ADAPTER_LISTEN="127.0.0.1:$ADAPTER_PORT" \
  PROVIDER_ADAPTER_TOKENS="quickstart:$service_hash" \
  LOCAL_PROVIDER_ENABLED=true LOCAL_STATE_DIR="$LOCAL"
wait_listening provider-adapter "$ADAPTER_PORT"
# The api applies the migrations before it listens, so the others start on
# the current schema.
start_service api API_LISTEN="127.0.0.1:$API_PORT" API_TOKENS="quickstart:$token_hash"
wait_listening api "$API_PORT"
start_service scheduler WORKER_API_URL="$API_URL"
start_service terminator
start_service watchdog
for name in scheduler terminator watchdog; do
  wait_listening "$name" "$(metrics_port "$name")"
done

rm -f "$DATA_DIR/env" # recreated owner-only (umask 077): it holds the token
cat >"$DATA_DIR/env" <<EOF
# Source this file to use the CLI against the quickstart: . $DATA_DIR/env
export FLOTILLA_API_URL=$API_URL
export FLOTILLA_API_TOKEN=$TOKEN
export PATH="$DATA_DIR/bin:\$PATH"
EOF

flotilla pools create "$POOL" --provider local --instance-type process --region local \
  --image "$BIN/agent" --if-not-exists >/dev/null
live=$(flotilla list --pool "$POOL" --state requested,provisioning,booting,installing,starting,ready -o ids | wc -l)
if [ "$AGENTS" -gt "$live" ]; then
  log "provisioning $((AGENTS - live)) agents in pool $POOL"
  flotilla provision --pool "$POOL" --count $((AGENTS - live)) --wait-timeout 120 >/dev/null
fi
flotilla list --pool "$POOL"

{
  echo
  echo "Flotilla is running. Ctrl-C here stops everything (or: $0 stop)."
  echo
  echo "  gRPC api        $API_URL  (plaintext, loopback only; token in $DATA_DIR/token)"
  for s in "${SERVICES[@]}"; do
    printf '  metrics         http://127.0.0.1:%s/metrics  (%s)\n' "$(metrics_port "$s")" "$s"
  done
  echo "  logs            $LOGS/<service>.log; agents: $LOCAL/machines/<machine>.log"
  echo "  database        $DATABASE_URL  (NATS namespace: ${NATS_NS:-none})"
  echo
  echo "  In another terminal:   . $DATA_DIR/env   then   flotilla list"
  echo
} >"$DATA_DIR/status.txt"
cat "$DATA_DIR/status.txt"
log "ready"

while :; do
  for name in "${SERVICES[@]}"; do
    if ! live_pid "$RUN/$name.pid" "/$name" >/dev/null; then
      tail -n 20 "$LOGS/$name.log" >&2
      log "$name exited (log: $LOGS/$name.log); stopping everything"
      exit 1
    fi
  done
  # In the background, so a signal is handled at once.
  sleep 1 &
  wait $! || true
done
