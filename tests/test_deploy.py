"""The deployment files: manifests valid for Kubernetes, the Dockerfile lint-clean, every flag real."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from keycourier.cli import _parser
from keycourier.policy import parse_policy

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES_VERSION = "1.33.0"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def documents():
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            yield pytest.param(document, id=f"{path.name}:{document['kind']}/{document['metadata']['name']}")


@pytest.mark.parametrize("document", documents())
def test_manifest_is_valid_kubernetes(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def containers():
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] == "Deployment":
                for container in document["spec"]["template"]["spec"]["containers"]:
                    if "keycourier" in container["image"]:
                        yield pytest.param(container, id=f"{path.name}:{container['name']}")


@pytest.mark.parametrize("container", containers())
def test_keycourier_containers_use_real_flags_and_probe_the_metrics_port(container):
    args = _parser().parse_args(container["args"])
    assert args.metrics_host == "0.0.0.0"  # the kubelet probes the pod address
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_policies_shipped_in_config_maps_are_valid():
    shipped = [document["data"]["policies.yaml"] for path in MANIFESTS for document in yaml.safe_load_all(path.read_text())
               if document["kind"] == "ConfigMap" and "policies.yaml" in document.get("data", {})]
    assert shipped
    for text in shipped:
        assert parse_policy(text).rules


def test_dockerfile_lints_clean_and_runs_a_real_command():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert _parser().parse_args(command).metrics_host == "0.0.0.0"
    assert re.search(r"^USER 10001$", text, re.M) and "HEALTHCHECK" in text


def test_grafana_dashboard_queries_only_metrics_keycourier_exports():
    from keycourier import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in suffixes[family.type]}
    dashboard = json.loads((DEPLOY / "grafana" / "keycourier-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"keycourier_[a-z_]+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    assert {"Requests by outcome", "Refusals by reason", "Key cache hit ratio"} <= {p["title"] for p in dashboard["panels"]}


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
