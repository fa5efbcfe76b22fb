#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 (mitmproxy 12 needs it) and installs keycourier with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

python_is_new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in "${KEYCOURIER_PYTHON:-}" python3.13 python3.12 python3 \
        $( (command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.1[2-9]*/bin/python3 2>/dev/null) | sort -rV); do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if python_is_new_enough "$candidate"; then command -v "$candidate"; return 0; fi
    done
    return 1
}

if [ ! -x .venv/bin/python ] || ! python_is_new_enough .venv/bin/python; then
    if ! python=$(find_python); then
        echo "setup: keycourier needs Python 3.12 or newer (mitmproxy 12 requires it) and none was found." >&2
        echo "setup: install one (e.g. 'pyenv install 3.12') or point KEYCOURIER_PYTHON at it." >&2
        exit 1
    fi
    echo "setup: creating .venv with $python ($("$python" --version))"
    rm -rf .venv
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

# checkov (the deploy/ scanner the tests run) pins an older botocore than keycourier needs: its own venv.
if [ ! -x .venv-tools/bin/checkov ]; then
    .venv/bin/python -m venv .venv-tools
    .venv-tools/bin/python -m pip install --quiet "checkov>=3.2,<4"
fi

# promtool (checks and unit-tests deploy/prometheus/): the binary from Debian's prometheus package, unpacked
# into .venv/bin; the Prometheus server itself is not installed.
if [ ! -x .venv/bin/promtool ]; then
    deb_dir=$(mktemp -d)
    if ! (cd "$deb_dir" && apt-get download -qq -o APT::Sandbox::User=root prometheus 2>/dev/null); then
        apt-get update -qq && (cd "$deb_dir" && apt-get download -qq -o APT::Sandbox::User=root prometheus)
    fi
    dpkg-deb --fsys-tarfile "$deb_dir"/prometheus_*.deb | tar -x -C "$deb_dir" ./usr/bin/promtool
    install -m 755 "$deb_dir/usr/bin/promtool" .venv/bin/promtool
    rm -rf "$deb_dir"
fi

# The embedded default policy encrypts with a local file key and re-signs for one local access key
# (the quickstart's store accepts it); make both on first set-up (mode 600, never committed).
if [ ! -f keys/dev.key ]; then
    .venv/bin/keycourier keygen keys/dev.key
fi
if [ ! -f keys/app-credentials.yaml ]; then
    (umask 077 && .venv/bin/python -c 'import secrets
print(f"access_key_id: AKIA{secrets.token_hex(8).upper()}\nsecret_access_key: {secrets.token_hex(20)}")' \
        > keys/app-credentials.yaml)
    echo "setup: wrote a new local access key to keys/app-credentials.yaml (mode 600)"
fi
echo "setup: ready ($(.venv/bin/python --version))"
