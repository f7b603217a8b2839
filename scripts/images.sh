#!/usr/bin/env bash
# Builds Flotilla's container images where no container registry can be
# reached: nothing is pulled, everything comes from Debian's packages and
# from binaries built here.
#
#   flotilla-base:bookworm  a minimal Debian root filesystem made with
#                           debootstrap from the mirror this machine's apt
#                           sources name, with what the images need
#                           (ca-certificates, curl, tini) and, for the
#                           compose test's stand-ins, postgresql and
#                           nats-server; imported with `docker import`.
#   flotilla:dev            the Dockerfile's `prebuilt` target on that base:
#                           the same runtime stage users get, with the
#                           binaries built on the host (`cargo build`).
#
# Both are cached: the base is rebuilt only when its recipe changes (a label
# carries the recipe's hash), the app image only when a binary changed
# (docker's own layer cache). Options: --release builds release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[images] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

profile=debug
cargo_profile=()
if [ "${1:-}" = "--release" ]; then
  profile=release
  cargo_profile=(--release)
fi

BASE_IMAGE=${FLOTILLA_BASE_IMAGE:-flotilla-base:bookworm}
APP_IMAGE=${FLOTILLA_IMAGE:-flotilla:dev}
SUITE=bookworm
PACKAGES=ca-certificates,curl,tini,procps,postgresql,nats-server

# The mirror apt uses here (deb822 sources first, then sources.list).
mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '{print $2}' | grep -v security | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list 2>/dev/null |
      awk '{print $2}' | grep -v security | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  local recipe
  recipe=$(printf '%s %s %s' "$SUITE" "$PACKAGES" "$(sha256sum "$0" | cut -c1-16)" | sha256sum | cut -c1-16)
  if [ "$(docker image inspect -f '{{ index .Config.Labels "flotilla.base.recipe" }}' "$BASE_IMAGE" 2>/dev/null || true)" = "$recipe" ]; then
    log "$BASE_IMAGE is up to date (recipe $recipe)"
    return
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  local root
  root=$(mktemp -d /tmp/flotilla-rootfs.XXXXXX)
  trap 'as_root rm -rf "$root"' RETURN
  local source
  source=$(mirror)
  log "debootstrap $SUITE from $source (a few minutes the first time)"
  as_root debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root/fs" "$source" \
    >"$root/debootstrap.log" 2>&1 || {
    tail -n 20 "$root/debootstrap.log" >&2
    exit 1
  }
  # What an image does not need: docs, man pages, locales, package caches.
  as_root rm -rf "$root"/fs/usr/share/doc/* "$root"/fs/usr/share/man/* \
    "$root"/fs/usr/share/locale/* "$root"/fs/var/cache/apt/archives/*.deb \
    "$root"/fs/var/lib/apt/lists/*
  log "importing $BASE_IMAGE"
  as_root tar --numeric-owner -C "$root/fs" -c . |
    docker import --change "LABEL flotilla.base.recipe=$recipe" \
      --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
}

build_app() {
  log "building the binaries ($profile)"
  cargo build --locked --quiet "${cargo_profile[@]}" --bins \
    -p flotilla-api -p flotilla-scheduler -p flotilla-terminator \
    -p flotilla-watchdog -p flotilla-provider-adapter -p flotilla-agent \
    -p flotilla-sim-provider -p flotilla-cli
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  rm -rf .docker-bin
  mkdir -p .docker-bin
  for bin in api scheduler terminator watchdog provider-adapter agent flotilla-sim flotilla; do
    # Stripped copies: the image needs no symbols, and is built faster.
    objcopy --strip-debug "$target_dir/$profile/$bin" ".docker-bin/$bin"
  done
  # The classic builder: it needs no buildx, and stops at `prebuilt`
  # before the Dockerfile's Rust stage.
  log "building $APP_IMAGE (Dockerfile target prebuilt on $BASE_IMAGE)"
  DOCKER_BUILDKIT=0 docker build --quiet --target prebuilt \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" -t "$APP_IMAGE" . >/dev/null
}

build_base
build_app
log "ready: $BASE_IMAGE, $APP_IMAGE"
