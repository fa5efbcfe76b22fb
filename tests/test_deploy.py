"""The deployment files: manifests valid for Kubernetes, the Dockerfile lint-clean, every flag real, the pods wired
as deploy/README.md says (the pod itself is run in tests/test_deploy_pod.py), alert rules and dashboard queries
checked by promtool against the metrics keycourier exports."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from keycourier.cli import _parser
from keycourier.policy import parse_policy

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES_VERSION = "1.33.0"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# Kinds of CRDs kubernetes-validate has no schema for: checked against tests/schemas/<group>_<version>.json.
CRD_GROUPS = {"monitoring.coreos.com/v1"}
PROMTOOL = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")


def all_documents():
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            yield path, document


def documents():
    for path, document in all_documents():
        yield pytest.param(document, id=f"{path.name}:{document['kind']}/{document['metadata']['name']}")


@pytest.mark.parametrize("document", list(documents()))
def test_manifest_is_valid_kubernetes(document):
    if document["apiVersion"] in CRD_GROUPS:
        group, version = document["apiVersion"].split("/")
        schema = json.loads((Path(__file__).parent / "schemas" / f"{group}_{version}.json").read_text())
        jsonschema.validate(document, schema)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def deployments():
    for path, document in all_documents():
        if document["kind"] == "Deployment":
            yield path, document


def keycourier_containers(pod: dict) -> list[dict]:
    return [c for c in pod.get("initContainers", []) + pod["containers"]
            if "keycourier" in c["image"] and c.get("args", [""])[0] == "run"]


def containers():
    for path, deployment in deployments():
        for container in keycourier_containers(deployment["spec"]["template"]["spec"]):
            yield pytest.param(container, id=f"{path.name}:{container['name']}")


@pytest.mark.parametrize("container", list(containers()))
def test_keycourier_containers_use_real_flags_and_probe_the_metrics_port(container):
    args = _parser().parse_args(container["args"])
    assert args.metrics_host == "0.0.0.0"  # the kubelet probes the pod address
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (container["securityContext"]["runAsUser"], container["securityContext"]["runAsGroup"]) == (10001, 10001)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(args.confdir)]["readOnly"] is True and "/tmp" in mounts


def test_policies_shipped_in_config_maps_are_valid():
    shipped = [document["data"]["policies.yaml"] for _, document in all_documents()
               if document["kind"] == "ConfigMap" and "policies.yaml" in document.get("data", {})]
    assert len(shipped) == 2
    for text in shipped:
        assert parse_policy(text).rules


@pytest.mark.parametrize("path, deployment", list(deployments()), ids=[p.name for p, _ in deployments()])
def test_every_config_map_is_defined_and_the_only_secret_is_the_ca_made_by_hand(path, deployment):
    pod = deployment["spec"]["template"]["spec"]
    namespace = deployment["metadata"]["namespace"]
    defined = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(path.read_text())
               if d["metadata"].get("namespace") == namespace or d["kind"] == "Namespace"}
    assert ("Namespace", namespace) in defined and ("ServiceAccount", pod["serviceAccountName"]) in defined
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in defined
        if "secret" in volume:
            # The CA cannot ship in a manifest: the file says how to make it, and the kubelet's mode lets 10001 read it.
            assert volume["secret"]["secretName"] == "keycourier-ca"
            assert f"-n {namespace} create secret generic keycourier-ca --from-file=./ca" in path.read_text()
    assert pod["securityContext"]["fsGroup"] == 10001


@pytest.mark.parametrize("path, deployment", list(deployments()), ids=[p.name for p, _ in deployments()])
def test_only_keycourier_gets_a_vault_token_and_the_policy_reads_it(path, deployment):
    pod = deployment["spec"]["template"]["spec"]
    accounts = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "ServiceAccount"]
    assert pod["automountServiceAccountToken"] is False and all(a["automountServiceAccountToken"] is False for a in accounts)
    tokens = {v["name"]: s["serviceAccountToken"] for v in pod["volumes"] if "projected" in v
              for s in v["projected"]["sources"] if "serviceAccountToken" in s}
    assert [(t["audience"], t["expirationSeconds"]) for t in tokens.values()] == [("vault", 600)]
    (volume, token), = tokens.items()
    holders = [c for c in pod.get("initContainers", []) + pod["containers"]
               if any(m["name"] == volume for m in c.get("volumeMounts", []))]
    assert [c["name"] for c in holders] == ["keycourier"]
    mount = next(m["mountPath"] for m in holders[0]["volumeMounts"] if m["name"] == volume)
    policy_map = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "ConfigMap")
    assert parse_policy(policy_map["data"]["policies.yaml"]).vault.auth.token_file == Path(mount) / token["path"]


def test_the_sidecar_is_native_and_the_application_keeps_its_trust_store():
    pod = next(d for p, d in deployments() if p.name == "sidecar.yaml")["spec"]["template"]["spec"]
    bundle, keycourier = pod["initContainers"]
    assert keycourier["name"] == "keycourier" and keycourier["restartPolicy"] == "Always" and "startupProbe" in keycourier
    assert "restartPolicy" not in bundle  # runs to completion before keycourier starts
    (app,) = pod["containers"]
    env = {e["name"]: e["value"] for e in app["env"]}
    written = re.findall(r"> (\S+)|cp \S+ (\S+)", bundle["args"][0])
    combined, extra_only = [a or b for a, b in written]
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["AWS_CA_BUNDLE"] == combined
    assert env["NODE_EXTRA_CA_CERTS"] == extra_only  # Node adds these to its own roots
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:8080" and "127.0.0.1" in env["NO_PROXY"]


def test_the_shared_proxy_drains_spreads_and_survives_voluntary_disruptions():
    objects = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "shared-proxy.yaml").read_text())}
    pod_template = objects["Deployment"]["spec"]["template"]
    pod = pod_template["spec"]
    (keycourier,) = keycourier_containers(pod)
    drain = _parser().parse_args(keycourier["args"]).drain_seconds
    pre_stop = keycourier["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The grace period starts with preStop; keycourier then drains, and needs a moment to exit.
    assert pod["terminationGracePeriodSeconds"] == pre_stop + drain + 5
    labels = pod_template["metadata"]["labels"]
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in pod["topologySpreadConstraints"])


def test_pod_monitors_scrape_what_the_annotations_announce():
    monitors = [d for _, d in all_documents() if d["kind"] == "PodMonitor"]
    assert len(monitors) == len(list(deployments())) == 2
    for monitor in monitors:
        (deployment,) = [d for _, d in deployments() if d["metadata"]["namespace"] == monitor["metadata"]["namespace"]]
        template = deployment["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in keycourier_containers(template["spec"]) for p in c["ports"]}
        annotations = template["metadata"]["annotations"]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert ports[endpoint["port"]] == int(annotations["prometheus.io/port"]) == 9464
        assert endpoint["path"] == annotations["prometheus.io/path"] == "/metrics"


def test_dockerfile_lints_clean_and_runs_a_real_command():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert _parser().parse_args(command).metrics_host == "0.0.0.0"
    assert re.search(r"^USER 10001:10001$", text, re.M) and "HEALTHCHECK" in text


def exported_metric_names() -> set[str]:
    from keycourier import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in suffixes[family.type]}


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert Path(PROMTOOL).exists(), "scripts/setup.sh installs promtool into .venv/bin"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$namespace": ".*", "$pod": ".*"}


def test_grafana_dashboard_queries_only_metrics_keycourier_exports(tmp_path):
    dashboard = json.loads((DEPLOY / "grafana" / "keycourier-dashboard.json").read_text())
    targets = [target for panel in dashboard["panels"] for target in panel["targets"]]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    queries = [t["expr"] for t in targets] + [v["query"]["query"] for v in variables.values() if v["type"] == "query"]
    queried = {name for query in queries for name in re.findall(r"keycourier_[a-z_]+", query)}
    assert queried and queried <= exported_metric_names(), queried - exported_metric_names()
    assert {"Requests by outcome", "Refusals by reason", "Key cache hit ratio"} <= {p["title"] for p in dashboard["panels"]}
    assert {"job", "namespace", "pod"} <= variables.keys()
    for target in targets:
        assert target["legendFormat"], target
        assert not re.search(r"\[\d+[smh]\]", target["expr"]), target["expr"]  # windows are $__rate_interval
        for selector in re.findall(r"keycourier_[a-z_]+(\{[^}]*\})?", target["expr"]):
            assert all(f'{label}=~"${label}"' in selector for label in ("job", "namespace", "pod")), target["expr"]
    # Every query is valid PromQL: promtool parses them as recording rules, Grafana's variables filled in.
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(t["expr"] for t in targets)]
    text = yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    for variable, value in GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    (tmp_path / "dashboard-rules.yaml").write_text(text)
    result = promtool("check", "rules", str(tmp_path / "dashboard-rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_valid_fire_when_they_should_and_use_exported_metrics():
    rules_file = DEPLOY / "prometheus" / "keycourier-alerts.yaml"
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("test", "rules", str(Path(__file__).parent / "prometheus" / "keycourier-alerts.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    alerts = {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}
    used = {name for expr in alerts.values() for name in re.findall(r"keycourier_[a-z_]+", expr)}
    assert used <= exported_metric_names(), used - exported_metric_names()
    assert {"keycourier_vault_requests_total", "keycourier_refusals_total", "keycourier_policy_reloads_total",
            "keycourier_key_cache_total"} <= used
    tested = set(re.findall(r"alertname: (\w+)", (Path(__file__).parent / "prometheus" / "keycourier-alerts.test.yaml").read_text()))
    assert tested == alerts.keys()


def test_checkov_finds_nothing_unjustified_in_deploy():
    checkov = DEPLOY.parent / ".venv-tools" / "bin" / "checkov"
    assert checkov.exists(), "scripts/setup.sh installs checkov into .venv-tools"
    result = subprocess.run([str(checkov), "-d", str(DEPLOY), "--compact", "--skip-download", "-o", "json"],
                            capture_output=True, text=True, timeout=300)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {report["check_type"] for report in reports} >= {"kubernetes", "dockerfile"}
    failed = [(check["check_id"], check["resource"]) for report in reports for check in report["results"].get("failed_checks", [])]
    assert failed == []
    # Every skip is justified in docs/deploy-security.md.
    justified = (DEPLOY.parent / "docs" / "deploy-security.md").read_text()
    for report in reports:
        for check in report["results"].get("skipped_checks", []):
            assert check["check_id"] in justified, check["check_id"]
