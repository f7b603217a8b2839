#!/usr/bin/env python3
"""Flotilla-specific checks of the deployment files, run by
scripts/validate-deploy.sh after the generic validators (docker-compose,
compose-spec JSON schema, Kubernetes schemas). Those prove the files are
well-formed; these prove they say what Flotilla needs: a migration step
before the services, probes, grace periods longer than the services' own
shutdown grace, credentials only in provider-adapter, binaries that the image
really contains, a dashboard and alerting rules that only query metrics the
code exports, and one set of alerting rules for compose and Kubernetes.

    check-deploy.py compose docker-compose.yml
    check-deploy.py k8s RENDERED.yaml [--overlay]
    check-deploy.py dashboard deploy/grafana/flotilla-dashboard.json crates/
    check-deploy.py dashboard-rules deploy/grafana/flotilla-dashboard.json OUT.yaml
    check-deploy.py binaries Dockerfile crates/ docker-compose.yml RENDERED.yaml...
    check-deploy.py alerts deploy/alerts/flotilla-alerts.yml deploy/k8s/monitoring/prometheusrule.yaml crates/

Each prints its findings and exits 1 when there is any. Needs PyYAML.
"""

import json
import pathlib
import re
import sys

import yaml

# The services built from this repository's image, as compose names them.
FLOTILLA_SERVICES = {"api", "scheduler", "terminator", "watchdog", "provider-adapter"}
PROVIDER_CLIENTS = {"api", "scheduler", "terminator", "watchdog"}
CREDENTIALS_SECRET = "flotilla-provider-credentials"


class Findings:
    def __init__(self, what):
        self.what = what
        self.items = []

    def __call__(self, message):
        self.items.append(message)

    def exit(self):
        for item in self.items:
            print(f"  {self.what}: {item}", file=sys.stderr)
        if self.items:
            print(f"{self.what}: {len(self.items)} problem(s)", file=sys.stderr)
            return 1
        print(f"{self.what}: ok")
        return 0


def check_compose(path):
    bad = Findings(f"compose {path}")
    doc = yaml.safe_load(pathlib.Path(path).read_text())
    services = doc.get("services") or {}
    for name in sorted(FLOTILLA_SERVICES | {"migrate", "nats", "postgres", "flotilla-sim"}):
        if name not in services:
            bad(f"service {name} is missing")
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                bad(f"{name} depends on {dep}, which is not a service")
            cond = (spec or {}).get("condition", "service_started")
            if cond == "service_healthy" and "healthcheck" not in services.get(dep, {}):
                bad(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        if name in FLOTILLA_SERVICES:
            if "healthcheck" not in svc:
                bad(f"{name} has no healthcheck")
            endpoint = str(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
            host = re.sub(r"^\w+://([^:/]+).*$", r"\1", endpoint)
            if host not in services:
                bad(f"{name} exports traces to {endpoint!r}, not to a collector service")
            if env.get("METRICS_ADDR", "").startswith("127."):
                bad(f"{name} serves /metrics on loopback only")
        if "DATABASE_URL" in env and name != "migrate":
            cond = (deps.get("migrate") or {}).get("condition")
            if cond != "service_completed_successfully":
                bad(f"{name} uses the database but does not wait for migrate to complete")
    migrate = services.get("migrate", {})
    if "--migrate-only" not in (migrate.get("command") or []):
        bad("migrate does not run `api --migrate-only`")
    if str(migrate.get("restart", "no")) != "no":
        bad("migrate must not restart once it has completed")
    adapter = (services.get("provider-adapter") or {}).get("environment") or {}
    if "flotilla-sim" not in str(adapter.get("SIM_API_BASE_URL", "")):
        bad("provider-adapter does not use the flotilla-sim service")
    # Every gRPC endpoint is TLS, and the adapter serves token holders only.
    api_env = (services.get("api") or {}).get("environment") or {}
    for svc, env, keys in (
        ("api", api_env, ("API_TLS_CERT", "API_TLS_KEY")),
        ("provider-adapter", adapter, (
            "PROVIDER_ADAPTER_TLS_CERT", "PROVIDER_ADAPTER_TLS_KEY", "PROVIDER_ADAPTER_TOKENS_FILE")),
    ):
        for key in keys:
            if not env.get(key):
                bad(f"{svc} has no {key}: its gRPC port would be plaintext or anonymous")
    for name in PROVIDER_CLIENTS:
        svc = services.get(name) or {}
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        if not str(env.get("PROVIDER_ADAPTER_URL", "")).startswith("https://"):
            bad(f"{name} reaches the provider-adapter without TLS")
        if not env.get("PROVIDER_ADAPTER_TOKEN_FILE") and not env.get("PROVIDER_ADAPTER_TOKEN"):
            bad(f"{name} has no service token for the provider-adapter")
    sched = (services.get("scheduler") or {}).get("environment") or {}
    if not str(sched.get("WORKER_API_URL", "")).startswith("https://"):
        bad("workers are told a plaintext WORKER_API_URL")
    nats = services.get("nats", {})
    if "--jetstream" not in (nats.get("command") or []) and "-js" not in (nats.get("command") or []):
        bad("nats runs without JetStream")
    if not any(str(v).endswith(":/data") for v in nats.get("volumes") or []):
        bad("nats keeps JetStream without a persistent volume")
    return bad.exit()


def containers(obj):
    spec = obj.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return template, template.get("containers", []) + template.get("initContainers", [])


def env_names(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_k8s(path, overlay):
    bad = Findings(f"k8s {path}")
    docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    configs = by_kind.get("ConfigMap", [])
    grace = 20
    for c in configs:
        if c["metadata"]["name"].startswith("flotilla-config"):
            grace = int(c.get("data", {}).get("SHUTDOWN_GRACE_SECONDS", grace))
    shared = {}
    for c in configs:
        if c["metadata"]["name"].startswith("flotilla-config"):
            shared = c.get("data", {})
    for key in ("PROVIDER_ADAPTER_URL", "WORKER_API_URL"):
        if not str(shared.get(key, "")).startswith("https://"):
            bad(f"flotilla-config {key} is not https://")
    tls_env = {
        "api": ("API_TLS_CERT", "API_TLS_KEY"),
        "provider-adapter": (
            "PROVIDER_ADAPTER_TLS_CERT", "PROVIDER_ADAPTER_TLS_KEY", "PROVIDER_ADAPTER_TOKENS_FILE"),
    }
    for name in sorted(FLOTILLA_SERVICES):
        dep = deployments.get(name)
        if dep is None:
            bad(f"no Deployment {name}")
            continue
        for key in tls_env.get(name, ()):
            if not any(key in env_names(c) for c in containers(dep)[1]):
                bad(f"{name}: no {key}: its gRPC port would be plaintext or anonymous")
        pod, ctrs = containers(dep)
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        tgp = pod.get("terminationGracePeriodSeconds", 30)
        if tgp <= grace:
            bad(f"{name}: terminationGracePeriodSeconds {tgp} <= SHUTDOWN_GRACE_SECONDS {grace}")
        if name == "api" and tgp < 2 * grace:
            bad(f"api: terminationGracePeriodSeconds {tgp} < twice the grace (calls, then relay)")
        for c in ctrs:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    bad(f"{name}/{c['name']}: no {probe}")
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits"):
                bad(f"{name}/{c['name']}: resources need requests and limits")
            if name in ("api", "provider-adapter") and "grpc" not in c.get("readinessProbe", {}):
                bad(f"{name}: readiness must be the gRPC health of its service")
            if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                bad(f"{name}/{c['name']}: root filesystem is writable")
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            bad(f"{name}: may run as root")
        if (labels.get("flotilla.dev/provider-client") == "true") != (name in PROVIDER_CLIENTS):
            bad(f"{name}: provider-client label is wrong (only {sorted(PROVIDER_CLIENTS)})")
        selector = dep["spec"]["selector"]["matchLabels"]
        if not any(
            p["spec"].get("selector", {}).get("matchLabels") == selector
            for p in by_kind.get("PodDisruptionBudget", [])
        ):
            bad(f"{name}: no PodDisruptionBudget selects it")
    # Only provider-adapter may see the provider credentials.
    for kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        for obj in by_kind.get(kind, []):
            text = json.dumps(obj["spec"])
            uses = re.search(rf'"{CREDENTIALS_SECRET}(-[a-z0-9]+)?"', text) is not None
            if uses and obj["metadata"]["name"] != "provider-adapter":
                bad(f"{kind} {obj['metadata']['name']} mounts {CREDENTIALS_SECRET}")
    adapter = deployments.get("provider-adapter")
    if adapter is not None:
        if CREDENTIALS_SECRET not in json.dumps(adapter["spec"]):
            bad("provider-adapter does not mount the provider credentials")
        if containers(adapter)[0].get("serviceAccountName") == "flotilla":
            bad("provider-adapter shares the other services' ServiceAccount")
    jobs = [j for j in by_kind.get("Job", []) if "--migrate-only" in json.dumps(j["spec"])]
    if not jobs:
        bad("no Job runs `api --migrate-only`")
    policies = [
        p
        for p in by_kind.get("NetworkPolicy", [])
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        == "provider-adapter"
    ]
    if not policies:
        bad("no NetworkPolicy guards provider-adapter")
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            ports = {pt.get("port") for pt in rule.get("ports", [])}
            if 50061 in ports or not ports:
                peers = rule.get("from")
                if not peers or any(
                    f.get("podSelector", {}).get("matchLabels", {}).get("flotilla.dev/provider-client")
                    != "true"
                    for f in peers
                ):
                    bad("provider-adapter's gRPC port is open to pods other than its clients")
    if overlay:
        names = {d["metadata"]["name"] for d in docs}
        for secret in (
            "flotilla-database",
            "flotilla-api-tokens",
            CREDENTIALS_SECRET,
            "flotilla-api-tls",
            "flotilla-provider-adapter-tls",
            "flotilla-ca",
            "flotilla-service-token",
            "flotilla-service-tokens",
        ):
            if not any(n == secret or n.startswith(secret + "-") for n in names):
                bad(f"overlay does not define the Secret {secret}")
    return bad.exit()


def check_dashboard(path, crates):
    bad = Findings(f"dashboard {path}")
    try:
        dash = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        bad(f"not valid JSON: {e}")
        return bad.exit()
    known = exported_metrics(crates)
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    if not exprs:
        bad("no queries found")
    used = set()
    for e in exprs:
        used.update(re.findall(r"\bflotilla_[a-z0-9_]+", e))
    for name in sorted(used):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in known and base not in known:
            bad(f"queries {name}, which no crate exports")
    titles = " ".join(p.get("title", "") for p in dash.get("panels", []) if p.get("type") == "row")
    for section in ("Fleet state", "Loop health", "Provider health", "Leaks"):
        if section not in titles:
            bad(f"no row {section!r}")
    print(f"dashboard: {len(exprs)} queries over {len(used)} metrics, all exported by the code")
    return bad.exit()


def dashboard_rules(path, out):
    """Writes every query of the dashboard as a recording rule, so that
    `promtool check rules` parses each one with Prometheus' own parser."""
    dash = json.loads(pathlib.Path(path).read_text())
    rules = []
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            if target.get("expr"):
                name = re.sub(r"[^a-zA-Z0-9_]", "_", panel.get("title", "panel"))
                rules.append({"record": f"dashboard:{name}:{target['refId']}", "expr": target["expr"]})
    groups = {"groups": [{"name": "flotilla-dashboard", "rules": rules}]}
    pathlib.Path(out).write_text(yaml.safe_dump(groups, sort_keys=False))
    print(f"dashboard: {len(rules)} panel queries written to {out}")
    return 0


def exported_metrics(crates):
    """Every `flotilla_*` name a crate's source mentions."""
    known = set()
    for rs in pathlib.Path(crates).rglob("*.rs"):
        known.update(re.findall(r'"(flotilla_[a-z0-9_]+)"', rs.read_text(errors="replace")))
    return known


def check_alerts(rules_path, prometheusrule_path, crates):
    """The alerting rules query only exported metrics, every rule has a
    severity and a summary, and the PrometheusRule carries exactly the
    groups of the rules file (one source of truth for both)."""
    bad = Findings(f"alerts {rules_path}")
    rules = yaml.safe_load(pathlib.Path(rules_path).read_text()) or {}
    groups = rules.get("groups") or []
    known = exported_metrics(crates)
    count = 0
    for group in groups:
        for rule in group.get("rules", []):
            count += 1
            name = rule.get("alert", rule.get("record", "?"))
            for metric in re.findall(r"\bflotilla_[a-z0-9_]+", rule.get("expr", "")):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                if metric not in known and base not in known:
                    bad(f"{name} queries {metric}, which no crate exports")
            if "alert" in rule:
                if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                    bad(f"{name} has no severity warning or critical")
                if not rule.get("annotations", {}).get("summary"):
                    bad(f"{name} has no summary")
    if count == 0:
        bad("no rules")
    doc = yaml.safe_load(pathlib.Path(prometheusrule_path).read_text()) or {}
    if doc.get("kind") != "PrometheusRule":
        bad(f"{prometheusrule_path} is not a PrometheusRule")
    if (doc.get("spec") or {}).get("groups") != groups:
        bad(f"{prometheusrule_path} spec.groups differ from {rules_path}: regenerate one from the other")
    print(f"alerts: {count} rules, PrometheusRule identical")
    return bad.exit()


def check_binaries(dockerfile, crates, compose, rendered):
    bad = Findings("binaries")
    bins = set()
    for toml in pathlib.Path(crates).glob("*/Cargo.toml"):
        text = toml.read_text()
        for block in re.findall(r"\[\[bin\]\]\s*\nname\s*=\s*\"([^\"]+)\"", text):
            bins.add(block)
    m = re.search(r"for bin in ([^;]+);", pathlib.Path(dockerfile).read_text())
    image = set(m.group(1).split()) if m else set()
    if not image:
        bad("Dockerfile: no `for bin in ...;` list of installed binaries")
    for b in sorted(image - bins):
        bad(f"Dockerfile installs {b}, which no crate builds")
    wanted = {"api", "scheduler", "terminator", "watchdog", "provider-adapter", "agent", "flotilla-sim"}
    for b in sorted(wanted - image):
        bad(f"Dockerfile does not install {b}")
    users = re.findall(r"^USER\s+(\S+)", pathlib.Path(dockerfile).read_text(), re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        bad("Dockerfile: the runtime image must end with a non-root USER")
    packages = set(re.findall(r"-p (flotilla-[a-z-]+)", pathlib.Path(dockerfile).read_text()))
    names = {
        re.search(r'^name\s*=\s*"([^"]+)"', t.read_text(), re.M).group(1)
        for t in pathlib.Path(crates).glob("*/Cargo.toml")
    }
    for p in sorted(packages - names):
        bad(f"Dockerfile builds package {p}, which does not exist")
    commands = []
    services = yaml.safe_load(pathlib.Path(compose).read_text()).get("services", {})
    for name, svc in services.items():
        if "build" in svc and svc.get("command"):
            commands.append((f"compose {name}", svc["command"][0]))
    for path in rendered:
        for d in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if not d or d["kind"] not in ("Deployment", "StatefulSet", "Job"):
                continue
            for c in containers(d)[1]:
                if c.get("image", "").split(":")[0].endswith("flotilla") and c.get("args"):
                    commands.append((f"{path} {d['metadata']['name']}", c["args"][0]))
    # The runtime base's own shell runs deploy/gen-certs.sh (compose `certs`).
    system = {"sh"}
    for where, cmd in commands:
        if cmd not in image and cmd not in system:
            bad(f"{where} runs {cmd!r}, which the image does not contain")
    return bad.exit()


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "compose":
        return check_compose(args[0])
    if cmd == "k8s":
        return check_k8s(args[0], "--overlay" in args[1:])
    if cmd == "dashboard":
        return check_dashboard(args[0], args[1])
    if cmd == "dashboard-rules":
        return dashboard_rules(args[0], args[1])
    if cmd == "alerts":
        return check_alerts(args[0], args[1], args[2])
    if cmd == "binaries":
        return check_binaries(args[0], args[1], args[2], args[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
