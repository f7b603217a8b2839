#!/usr/bin/env bash
# Installs the third-party gRPC client the reflection tests drive (Python
# grpcio with grpcio-reflection) into a virtualenv under the cargo target
# directory, once; the tests find it at $TARGET/python-client. Prints the
# venv's python. A later run with the same pins does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
venv="$target/python-client"
# Pinned, so every machine tests against the same client.
pins="grpcio==1.85.3 grpcio-reflection==1.85.1 protobuf==7.36.2"

# One installer at a time (test binaries may run this in parallel).
exec 9>"$target/python-client.lock"
flock 9

if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins" ]; then
  echo "$venv/bin/python"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $pins >&2
echo "$pins" >"$venv/.pins"
echo "$venv/bin/python"
