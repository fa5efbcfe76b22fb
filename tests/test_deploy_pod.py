"""The pods of deploy/kubernetes/ (sidecar and shared proxy), run here as the kubelet would run them, minus the container runtime.

No Docker engine and no cluster exist here, so the pods are simulated, and only where they must be:

- every volume becomes a directory laid out as the kubelet lays it out, with the owners and modes the kubelet
  gives (Secret and projected files: `defaultMode`/`mode`, owner root, and with `fsGroup` group fsGroup and
  `| 0440`; a projected service-account token 0600, owner FsUser (the one runAsUser all containers share, else
  root) — kubernetes pkg/volume/volume_linux.go, pkg/volume/projected/projected.go, pkg/volume/util FsUserFrom);
- each container's command is the image's (the Dockerfile's ENTRYPOINT, CMD unless the manifest gives args)
  with the manifest's args, run as the manifest's runAsUser/runAsGroup with fsGroup as supplementary group,
  no capabilities and no_new_privs (setpriv); mount paths in arguments, environment and policy are replaced by
  those directories;
- the outside world is on 127.0.0.1: Vault and S3 are the suite's test servers with a test CA, so the policy's
  Vault address and endpoint host are replaced, Vault's CA comes from VAULT_CACERT and the S3 upstream's from
  --upstream-ca, and the application's NO_PROXY loses 127.0.0.1; the test CA also stands in for the public CA
  in the image's system bundle that the init container reads.

The interpreter lives under /root (mode 0700) on this machine: uid 10001 could not start it at all. The
containers therefore run in a private mount namespace in which such a directory is replaced by a tmpfs holding
only bind mounts of what the interpreter needs; nothing else about file access changes.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
import requests
import yaml
from botocore.config import Config

from tests.conftest import free_port, stop_process
from tests.upstreams.s3 import S3Upstream
from tests.upstreams.vault import VaultServer

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
IMAGE_SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # python:3.12-slim's ca-certificates package
ACCESS_KEY, SECRET = "AKIAKEYCOURIERPOD001", "kc/SecretAccessKey+ForThePodTestOnly00001"
PAYROLL_KEY = os.urandom(32)
SERVICE_ACCOUNT_JWT = "eyJ.projected-token-for-audience-vault.sig"


def manifest(name: str) -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text())}


def dockerfile_instruction(name: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return json.loads(re.search(rf"^{name} (\[.*\])$", text, re.M).group(1))


# --- the kubelet's volumes ---------------------------------------------------------------------------------

def fs_user(pod: dict) -> int | None:
    """FsUserFrom: the runAsUser every (init) container shares, else None."""
    users = {(c.get("securityContext") or {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
             for c in pod.get("initContainers", []) + pod["containers"]}
    return users.pop() if len(users) == 1 and None not in users else None


def place(path: Path, data: bytes, mode: int, uid: int, gid: int | None, readonly: bool = True) -> None:
    """One file as the kubelet leaves it: SetVolumeOwnership chowns to fsGroup and ors in 0440 (read-only volumes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid if gid is not None else 0)
    os.chmod(path, mode | ((0o440 if readonly else 0o660) if gid is not None else 0))


def atomic_write(where: Path, files: dict[str, tuple[bytes, int, int, int | None]]) -> None:
    """The kubelet's AtomicWriter: files in a new `..<timestamp>` directory, `..data` swapped to it, each name a
    symlink through `..data`, the previous timestamp directory removed. Secret, ConfigMap and projected
    volumes look like this, and a rotated token or an updated ConfigMap arrives like this."""
    previous = os.readlink(where / "..data") if (where / "..data").is_symlink() else None
    stamp = Path(tempfile.mkdtemp(prefix=time.strftime("..%Y_%m_%d_%H_%M_%S."), dir=where))
    stamp.chmod(0o755)
    for name, (data, mode, uid, gid) in files.items():
        place(stamp / name, data, mode, uid, gid)
    (where / "..data_tmp").symlink_to(stamp.name)
    (where / "..data_tmp").rename(where / "..data")
    for name in files:
        if not (where / name).is_symlink():
            (where / name).symlink_to(Path("..data") / name)
    if previous:
        shutil.rmtree(where / previous)


def make_volumes(pod: dict, root: Path, namespace_objects: dict[str, dict], secrets: dict[str, dict[str, bytes]],
                 token: str) -> dict[str, Path]:
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    volumes = {}
    for volume in pod["volumes"]:
        where = volumes[volume["name"]] = root / "volumes" / volume["name"]
        where.mkdir(parents=True)
        os.chown(where, 0, fs_group or 0)
        where.chmod(0o755)
        if "configMap" in volume or "secret" in volume:
            source = volume.get("configMap") or volume["secret"]
            data = ({k: v.encode() for k, v in namespace_objects[source["name"]]["data"].items()} if "configMap" in volume
                    else secrets[source["secretName"]])
            items = source.get("items") or [{"key": key, "path": key} for key in data]
            atomic_write(where, {item["path"]: (data[item["key"]], item.get("mode", source.get("defaultMode", 0o644)),
                                                0, fs_group) for item in items})
        elif "projected" in volume:
            (projection,) = volume["projected"]["sources"]
            atomic_write(where, {projection["serviceAccountToken"]["path"]: token_file(pod, volume, token)})
        elif "emptyDir" in volume:
            where.chmod(0o2777 if fs_group is not None else 0o777)
        else:
            raise AssertionError(f"volume type not simulated: {volume}")
    return volumes


def token_file(pod: dict, volume: dict, token: str) -> tuple[bytes, int, int, int | None]:
    """A projected service-account token: 0600 and owner FsUser when fsGroup or FsUser is set (then | 0440)."""
    fs_group, owner = pod.get("securityContext", {}).get("fsGroup"), fs_user(pod)
    mode = 0o600 if owner is not None or fs_group is not None else volume["projected"].get("defaultMode", 0o644)
    return token.encode(), mode, owner or 0, fs_group


# --- the container runtime, as far as file access goes -----------------------------------------------------

def blocked_ancestors(paths: list[Path]) -> dict[Path, set[str]]:
    """Directories that others may not search, on the way to `paths`, with the entries needed below each."""
    blocked: dict[Path, set[str]] = {}
    for path in paths:
        for parent, child in zip(path.parents, (path, *path.parents)):
            if parent != child and not parent.stat().st_mode & stat.S_IXOTH:
                blocked.setdefault(parent, set()).add(child.relative_to(parent).parts[0])
    return blocked


def reachable_prelude(stage: Path) -> str:
    """Shell lines, run in a private mount namespace, that make the interpreter reachable for any uid."""
    lines = []
    needed = [Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), Path(sys.prefix), REPO]
    for number, (directory, children) in enumerate(sorted(blocked_ancestors(needed).items(), key=lambda i: len(i[0].parts))):
        original = stage / str(number)
        original.mkdir()
        lines.append(f"mount --bind '{directory}' '{original}' && mount -t tmpfs -o mode=755 tmpfs '{directory}'")
        for child in sorted(children):
            make = "mkdir" if (directory / child).is_dir() else "touch"
            lines.append(f"{make} '{directory / child}' && mount --bind '{original / child}' '{directory / child}'")
    return " && ".join(lines)


def resolve(command: list[str]) -> list[str]:
    """The image's `keycourier` is the console script `pip install .` makes; here, the one in this venv."""
    return [str(Path(sys.executable).parent / "keycourier") if part == "keycourier" and i == 0 else part
            for i, part in enumerate(command)]


def rewrite(value: str, mounts: dict[str, Path]) -> str:
    """Container paths under a mount point replaced by the volume's directory here (in one pass)."""
    if not mounts:
        return value
    pattern = "|".join(re.escape(path) for path in sorted(mounts, key=len, reverse=True))
    return re.sub(rf"(?<![\w./-])({pattern})(?![\w.-])", lambda m: str(mounts[m.group(1)]), value)


class Container:
    """One container of the pod, started as the container runtime would start it (files and identity)."""

    def __init__(self, pod: dict, spec: dict, volumes: dict[str, Path], root: Path, *, extra_args=(), env=None):
        self.spec = spec
        self.mounts = {m["mountPath"]: volumes[m["name"]] for m in spec.get("volumeMounts", [])}
        context = spec.get("securityContext", {})
        self.uid = context.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
        self.gid = context.get("runAsGroup", self.uid)
        self.fs_group = pod.get("securityContext", {}).get("fsGroup")
        command = spec.get("command") or dockerfile_instruction("ENTRYPOINT")
        args = spec["args"] if "args" in spec else ([] if "command" in spec else dockerfile_instruction("CMD"))
        self.argv = resolve([rewrite(part, self.mounts) for part in command + args]) + list(extra_args)
        home = root / "home"
        home.mkdir(exist_ok=True, mode=0o755)
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
                    **{e["name"]: rewrite(e["value"], self.mounts) for e in spec.get("env", [])}, **(env or {})}
        self.log_path = root / f"{spec['name']}.log"
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=root))
        groups = ["--groups", str(self.fs_group)] if self.fs_group is not None else ["--clear-groups"]
        identity = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups, "--no-new-privs",
                    "--inh-caps=-all", "--"]
        prelude = reachable_prelude(stage)
        self.full_argv = (["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                           f'{prelude} && exec "$@"', "prelude", *identity, *self.argv] if prelude else identity + self.argv)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.full_argv, env=self.env, cwd=home, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_startup_probe(container: Container, probe_spec: dict, port: int) -> None:
    """As the kubelet: httpGet every periodSeconds, at most failureThreshold times (here at 0.1 s steps)."""
    deadline = time.monotonic() + probe_spec["periodSeconds"] * probe_spec["failureThreshold"]
    while time.monotonic() < deadline:
        if container.process.poll() is not None:
            raise AssertionError(f"{container.spec['name']} exited {container.process.returncode}:\n{container.log()}")
        try:
            if probe(port, probe_spec["httpGet"]["path"]) == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"startupProbe never passed:\n{container.log()}")


# --- the pod -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root():
    directory = Path(tempfile.mkdtemp(prefix="keycourier-pod-", dir="/tmp"))  # every uid can reach /tmp; TMPDIR maybe not
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture(scope="module")
def ca_secret(root) -> dict[str, bytes]:
    """`keycourier ca --generate ./ca` then `kubectl create secret generic keycourier-ca --from-file=./ca`."""
    source = root / "operator-ca"
    subprocess.run([sys.executable, "-m", "keycourier.cli", "ca", "--generate", str(source)], check=True, capture_output=True)
    return {path.name: path.read_bytes() for path in source.iterdir()}


@pytest.fixture(scope="module")
def servers(ca):
    with VaultServer(ca) as vault, S3Upstream(ca, {ACCESS_KEY: SECRET}) as s3:
        s3.create_bucket("payroll-2026")
        vault.kv_put("keycourier/payroll", {"key": base64.b64encode(PAYROLL_KEY).decode()})
        for account in ("aws-legacy-app", "aws-app"):
            vault.kv_put(f"keycourier/{account}", {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET})
        vault.set_policy("keycourier", {"secret/data/keycourier/*": ["read"]})
        for role in ("legacy-app", "keycourier"):
            vault.add_kubernetes_role(role, service_account_jwt=SERVICE_ACCOUNT_JWT, token_policies=["keycourier"])
        yield vault, s3


@contextlib.contextmanager
def running_pod(name: str, root: Path, ca, ca_secret: dict[str, bytes], vault: VaultServer, s3: S3Upstream):
    """The Deployment's pod from deploy/kubernetes/`name`: volumes laid out, init containers run to completion,
    native sidecars and keycourier containers started and their startupProbe awaited (the application
    container is not started: the tests play the application, with its environment)."""
    root.mkdir(mode=0o755)
    objects = manifest(name)
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    config_map = objects["ConfigMap"]
    policy = config_map["data"]["policies.yaml"]
    for placeholder in ("https://vault.vault.svc:8200", '"*.amazonaws.com"'):
        assert placeholder in policy, f"the simulation replaces {placeholder}; the manifest changed"
    policy = policy.replace("https://vault.vault.svc:8200", vault.addr).replace('"*.amazonaws.com"', f'"127.0.0.1:{s3.port}"')
    test_ca = root / "test-ca.pem"
    ca.cert_pem.write_to_path(str(test_ca))
    test_ca.chmod(0o644)
    volumes = make_volumes(spec, root, {config_map["metadata"]["name"]: {"data": {"policies.yaml": policy}}},
                           {"keycourier-ca": ca_secret}, SERVICE_ACCOUNT_JWT)
    # The policy's own paths (token_file) are container paths too.
    keycourier_spec = next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "keycourier")
    mounts = {m["mountPath"]: volumes[m["name"]] for m in keycourier_spec["volumeMounts"]}
    (volumes["policies"] / "policies.yaml").write_text(rewrite(policy, mounts))

    # The image's system bundle, with the test CA standing in for the public CA real upstreams use.
    system_bundle = root / "image-system-bundle.pem"
    system_bundle.write_text(Path(IMAGE_SYSTEM_BUNDLE).read_text() + ca.cert_pem.bytes().decode())
    system_bundle.chmod(0o644)

    started = []
    try:
        for container_spec in spec.get("initContainers", []) + spec["containers"]:
            if container_spec.get("restartPolicy") == "Always" or container_spec["name"] == "keycourier":
                ports = {"--listen-port": free_port(), "--metrics-port": free_port()}
                container = Container(spec, container_spec, volumes, root, env={"VAULT_CACERT": str(test_ca)},
                                      extra_args=[*(str(x) for kv in ports.items() for x in kv), "--upstream-ca", str(test_ca)])
                started.append(container)
                container.ports = ports
                wait_for_startup_probe(container, container_spec["startupProbe"], ports["--metrics-port"])
            elif container_spec in spec.get("initContainers", []):  # a plain init container: runs to completion first
                container_spec = json.loads(json.dumps(container_spec).replace(IMAGE_SYSTEM_BUNDLE, str(system_bundle)))
                container = Container(spec, container_spec, volumes, root)
                assert container.wait(10) == 0, container.log()
                container.stop()
        yield {"spec": spec, "volumes": volumes, "keycourier": started[0], "vault": vault, "s3": s3, "root": root}
    finally:
        for container in started:
            container.stop()


@pytest.fixture(scope="module")
def pod(root, ca, ca_secret, servers):
    with running_pod("sidecar.yaml", root / "sidecar", ca, ca_secret, *servers) as started:
        yield started


@pytest.fixture(scope="module")
def shared_pod(root, ca, ca_secret, servers):
    with running_pod("shared-proxy.yaml", root / "shared-proxy", ca, ca_secret, *servers) as started:
        yield started


def put_payroll_object(s3: S3Upstream, monkeypatch, env: dict[str, str], key: str) -> None:
    """boto3 as the legacy application builds it, with nothing but `env`: the object must arrive encrypted."""
    for name in ("AWS_PROFILE", "no_proxy", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**env, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url,
                                            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}))
    client.put_object(Bucket="payroll-2026", Key=key, Body=b"salary,1\n")
    assert s3.stored("payroll-2026", key).sse_customer_key_md5 == base64.b64encode(hashlib.md5(PAYROLL_KEY).digest()).decode()


def test_keycourier_runs_as_the_manifest_says_and_passes_its_probes(pod):
    keycourier = pod["keycourier"]
    status = Path(f"/proc/{keycourier.process.pid}/status").read_text()
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M)
    assert re.search(r"^Gid:\s+10001\s+10001\s+10001\s+10001$", status, re.M)
    assert re.search(r"^Groups:\s+10001\s*$", status, re.M) and re.search(r"^CapEff:\s+0+$", status, re.M)
    assert probe(keycourier.ports["--metrics-port"], "/healthz") == 200
    assert probe(keycourier.ports["--metrics-port"], "/readyz") == 200  # Vault reached with its CA
    socket.create_connection(("127.0.0.1", keycourier.ports["--listen-port"]), timeout=2).close()
    # What it read, it read through the kubelet's modes: nothing in the Secret is readable by others.
    for path in pod["volumes"]["keycourier-ca"].glob("[!.]*"):
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 10001, 0o440)


def test_the_vault_token_is_read_where_the_kubelet_rotates_it(pod):
    """The kubelet renews the projected token before it expires (600 s here) by writing a new timestamp directory
    and removing the old one: the policy's token_file must still name the live token afterwards."""
    from keycourier.policy import load_policy

    policy = load_policy(pod["volumes"]["policies"] / "policies.yaml")  # as keycourier read it at start
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "vault-token"]
    (projection,) = volume["projected"]["sources"]
    atomic_write(pod["volumes"]["vault-token"],
                 {projection["serviceAccountToken"]["path"]: token_file(pod["spec"], volume, "eyJ.rotated.sig")})
    pod["vault"].add_kubernetes_role("legacy-app", service_account_jwt="eyJ.rotated.sig", token_policies=["keycourier"])
    assert policy.vault.auth.token_file.read_text() == "eyJ.rotated.sig"


def app_env(pod) -> dict[str, str]:
    """The application container's environment, its mount paths replaced; 127.0.0.1 is where S3 is here."""
    app = pod["spec"]["containers"][0]
    mounts = {m["mountPath"]: pod["volumes"][m["name"]] for m in app["volumeMounts"]}
    port = str(pod["keycourier"].ports["--listen-port"])
    env = {e["name"]: rewrite(e["value"], mounts).replace(":8080", f":{port}") for e in app["env"]}
    env["NO_PROXY"] = ",".join(h for h in env["NO_PROXY"].split(",") if h != "127.0.0.1")
    return env


def test_the_application_writes_encrypted_through_the_pods_keycourier(pod, monkeypatch):
    """boto3 with nothing but the app container's environment: trusts keycourier through the bundle, and the
    object is stored with the Vault key, which keycourier got by logging in with its projected token."""
    put_payroll_object(pod["s3"], monkeypatch, app_env(pod), "march.csv")
    assert pod["vault"].count("POST", "/v1/auth/kubernetes/login") >= 1


def test_the_shared_proxy_pod_starts_and_encrypts_for_a_client(shared_pod, ca_secret, monkeypatch, root):
    """All its containers run as 10001, so the kubelet gives the projected token to 10001 (FsUser)."""
    keycourier = shared_pod["keycourier"]
    status = Path(f"/proc/{keycourier.process.pid}/status").read_text()
    assert re.search(r"^Uid:\s+10001\s", status, re.M) and re.search(r"^Groups:\s+10001\s*$", status, re.M)
    token = (shared_pod["volumes"]["vault-token"] / "token").stat()
    assert (token.st_uid, token.st_gid, stat.S_IMODE(token.st_mode)) == (10001, 10001, 0o640)
    assert probe(keycourier.ports["--metrics-port"], "/readyz") == 200
    client_ca = root / "shared-proxy" / "client-ca.pem"
    client_ca.write_bytes(ca_secret["mitmproxy-ca-cert.pem"])
    url = f"http://127.0.0.1:{keycourier.ports['--listen-port']}"
    put_payroll_object(shared_pod["s3"], monkeypatch, {"HTTPS_PROXY": url, "AWS_CA_BUNDLE": str(client_ca)}, "april.csv")


def test_the_bundle_keeps_the_applications_trust_for_hosts_keycourier_tunnels(pod, ca_secret):
    """A host that is not an endpoint is tunnelled untouched: the application must still trust its real CA.
    With the bundle it does; with keycourier's CA alone (the previous manifests) it does not."""
    env = app_env(pod)
    proxies = {"https": env["HTTPS_PROXY"]}
    bundle = Path(env["SSL_CERT_FILE"])
    assert env["REQUESTS_CA_BUNDLE"] == env["AWS_CA_BUNDLE"] == str(bundle)
    health = f"{pod['vault'].addr}/v1/sys/health"
    assert requests.get(health, proxies=proxies, verify=str(bundle), timeout=10).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(health, proxies=proxies, verify=env["NODE_EXTRA_CA_CERTS"], timeout=10)
    # The bundle is the image's system CAs plus exactly keycourier's certificate; NODE_EXTRA_CA_CERTS only the latter.
    system = ssl.create_default_context(cafile=IMAGE_SYSTEM_BUNDLE).cert_store_stats()["x509_ca"]
    assert ssl.create_default_context(cafile=str(bundle)).cert_store_stats()["x509_ca"] == system + 2  # + test CA + keycourier
    assert Path(env["NODE_EXTRA_CA_CERTS"]).read_bytes() == ca_secret["mitmproxy-ca-cert.pem"]


def test_the_application_user_can_read_the_bundle_and_mounts_nothing_of_keycouriers(pod):
    """fsGroup is the pod's: the application's user has group 10001 too, and could read keycourier's CA key and
    Vault token if they were in its container. They are not: a container sees only its own volumeMounts."""
    app = pod["spec"]["containers"][0]
    bundle, extra = app_env(pod)["SSL_CERT_FILE"], app_env(pod)["NODE_EXTRA_CA_CERTS"]
    check = Container(pod["spec"], {**app, "name": "app-check", "command": ["/bin/sh", "-c"],
                                    "args": [f"test -r {bundle} && test -r {extra}"]}, pod["volumes"], pod["root"])
    assert check.wait(10) == 0, check.log()
    check.stop()
    assert {m["name"] for m in app["volumeMounts"]} == {"ca-bundle"}
    assert "env" not in app or not any("valueFrom" in e for e in app["env"])


def test_the_previous_secret_mode_without_fs_group_could_not_start(root, ca_secret):
    """The manifests before: defaultMode 0400, no fsGroup. The same simulation then fails as the pod did."""
    spec = manifest("sidecar.yaml")["Deployment"]["spec"]["template"]["spec"]
    spec = {**spec, "securityContext": {k: v for k, v in spec["securityContext"].items() if k != "fsGroup"},
            "volumes": [{"name": "keycourier-ca", "secret": {"secretName": "keycourier-ca", "defaultMode": 0o400}},
                        *(v for v in spec["volumes"] if v["name"] not in ("keycourier-ca",))]}
    keycourier_spec = next(c for c in spec["initContainers"] if c["name"] == "keycourier")
    old_root = root / "previous"
    old_root.mkdir(mode=0o755)
    policy = "version: 1\nendpoints: []\nrules: []\n"
    volumes = make_volumes(spec, old_root, {"keycourier-policies": {"data": {"policies.yaml": policy}}},
                           {"keycourier-ca": ca_secret}, SERVICE_ACCOUNT_JWT)
    container = Container(spec, keycourier_spec, volumes, old_root,
                          extra_args=["--listen-port", str(free_port()), "--metrics-port", str(free_port())])
    try:
        assert container.wait(20) != 0
        assert "PermissionError" in container.log() and "mitmproxy-ca.pem" in container.log()
    finally:
        container.stop()


def test_the_image_default_confdir_takes_a_new_ca_without_a_mount(root):
    """`docker run` without the Secret: the Dockerfile's /var/lib/keycourier (owner and mode as it makes it) is
    where CMD's --confdir points, and uid 10001 can create the CA there."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    made = re.search(r"install -d -o (\d+) -g (\d+) -m (\d+) (\S+)", text)
    cmd = dockerfile_instruction("CMD")
    confdir = cmd[cmd.index("--confdir") + 1]
    assert made and made.group(4) == confdir
    image_dir = root / "image-var-lib-keycourier"
    image_dir.mkdir()
    os.chown(image_dir, int(made.group(1)), int(made.group(2)))
    image_dir.chmod(int(made.group(3), 8))
    pod_spec = {"securityContext": {}, "containers": []}
    container = Container(pod_spec, {"name": "docker-run", "args": ["ca", "--confdir", confdir],
                                     "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
                                     "volumeMounts": [{"name": "image", "mountPath": confdir}]},
                          {"image": image_dir}, root)
    assert container.wait(20) == 0, container.log()
    container.stop()
    assert (image_dir / "mitmproxy-ca.pem").stat().st_uid == 10001
    assert stat.S_IMODE((image_dir / "mitmproxy-ca.pem").stat().st_mode) == 0o600
