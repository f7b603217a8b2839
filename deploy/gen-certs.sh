#!/bin/sh
# Makes what a Flotilla installation needs to run TLS and authenticated
# internal calls, with openssl only:
#
#   deploy/gen-certs.sh [DIR [CA_KEY_DIR]]   (default: ./certs, and DIR)
#
# DIR/ca.pem                      a local CA (10 years); its key goes to
#                                 CA_KEY_DIR/ca-key.pem, kept apart so the
#                                 services that mount DIR never see it
# DIR/<name>.pem, <name>-key.pem  a server certificate for each of
#                                 $CERT_SERVICES (default "api provider-adapter"),
#                                 valid for DNS:<name>, DNS:localhost,
#                                 IP:127.0.0.1 and $CERT_EXTRA_SANS
# DIR/service-token               the service token the adapter's callers send
# DIR/service-tokens              its entry for PROVIDER_ADAPTER_TOKENS_FILE
#                                 (name:sha256hex; the token itself is not in it)
#
# Idempotent: what exists and is still good (a certificate signed by this
# CA, valid for 30 more days) is kept, so re-running it (every `docker
# compose up` does, as the `certs` service) changes nothing. Keys and the
# token are written owner-only (0600); $CERTS_OWNER (uid:gid) gets them.
# For production use your own CA (cert-manager, a corporate CA) and put the
# same files into Secrets; see deploy/README.md.
set -eu

dir=${1:-certs}
ca_dir=${2:-$dir}
days=${CERT_DAYS:-825}
services=${CERT_SERVICES:-api provider-adapter}
extra=${CERT_EXTRA_SANS:-}

command -v openssl >/dev/null 2>&1 || {
  echo "gen-certs: openssl is required (Debian: apt-get install openssl)" >&2
  exit 1
}
umask 077
mkdir -p "$dir" "$ca_dir"
ca_key=$ca_dir/ca-key.pem

if [ ! -s "$dir/ca.pem" ] || [ ! -s "$ca_key" ]; then
  echo "gen-certs: new CA in $dir/ca.pem"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$ca_key" -out "$dir/ca.pem" -days 3650 \
    -subj "/CN=Flotilla local CA" 2>/dev/null
fi

for name in $services; do
  cert=$dir/$name.pem
  key=$dir/$name-key.pem
  if [ -s "$cert" ] && [ -s "$key" ] \
    && openssl x509 -in "$cert" -noout -checkend 2592000 >/dev/null 2>&1 \
    && openssl verify -CAfile "$dir/ca.pem" "$cert" >/dev/null 2>&1; then
    continue
  fi
  echo "gen-certs: certificate for $name"
  sans="DNS:$name,DNS:localhost,IP:127.0.0.1"
  for san in $extra; do
    sans="$sans,$san"
  done
  ext=$dir/$name.ext
  printf '%s\n' \
    "subjectAltName=$sans" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$key" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$ca_key" \
    -CAcreateserial -out "$cert" -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
done

if [ ! -s "$dir/service-token" ]; then
  echo "gen-certs: new service token"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/service-token"
fi
hash=$(printf %s "$(cat "$dir/service-token")" | sha256sum | cut -d' ' -f1)
printf 'services:%s\n' "$hash" >"$dir/service-tokens"

# Certificates are public; keys and the token are not.
chmod 644 "$dir"/*.pem "$dir/service-tokens"
chmod 600 "$dir"/*-key.pem "$ca_key" "$dir/service-token"
chmod 755 "$dir"
rm -f "$dir/ca.srl"
if [ -n "${CERTS_OWNER:-}" ]; then
  chown -R "$CERTS_OWNER" "$dir"
fi
