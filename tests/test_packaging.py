"""The wheel installs only the `keycourier` packages, and declares exactly what keycourier imports at run time."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Import names of the runtime distributions, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml", "prometheus-client": "prometheus_client"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("keycourier-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_keycourier_packages_only(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"keycourier"}
    packages = {str(Path(name).parent) for name in wheel.namelist() if name.endswith("/__init__.py")}
    assert packages == {"keycourier", "keycourier/addons", "keycourier/dialects", "keycourier/signers"}


def test_runtime_dependencies_are_exactly_the_imported_distributions(wheel):
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    fields = Parser().parsestr(wheel.read(metadata).decode())
    runtime = {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
               for requirement in fields.get_all("Requires-Dist") if "extra ==" not in requirement}
    imported = set()
    for source in [*(REPO / "proxy").rglob("*.py"), *(REPO / "addons").glob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"keycourier"}
    assert {IMPORT_NAMES.get(name, name) for name in runtime} == third_party
