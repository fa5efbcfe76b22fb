"""The `keycourier` command: run the proxy, check a policy, show the CA, make a key."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from keycourier import rotate
from keycourier.policy import PolicyError, load_policy

DEFAULT_CONFDIR = Path("~/.keycourier").expanduser()
CA_CERT_NAME = "mitmproxy-ca-cert.pem"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keycourier", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the proxy")
    run.add_argument("--policies", required=True, type=Path, help="policy file (policies.yaml)")
    run.add_argument("--listen-host", default="127.0.0.1")
    run.add_argument("--listen-port", type=int, default=8080)
    run.add_argument("--mode", default="regular", help="regular (HTTPS_PROXY) or reverse:https://upstream")
    run.add_argument("--upstream-ca", type=Path, help="PEM CA trusted for upstreams, in addition to the system's")
    run.add_argument("--confdir", type=Path, default=DEFAULT_CONFDIR, help="where the interception CA lives")
    run.add_argument("--save-flows", type=Path, help="write flows (key headers redacted) to this file")
    run.add_argument("--metrics-host", default="127.0.0.1", help="where /metrics, /healthz and /readyz listen")
    run.add_argument("--metrics-port", type=int, default=9464)
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="audit log lines")
    run.set_defaults(command=_run)

    check = commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(command=_check)

    ca = commands.add_parser("ca", help="print the path of the CA certificate clients must trust")
    ca.add_argument("--confdir", "--generate", type=Path, default=DEFAULT_CONFDIR,
                    help="the CA's directory; created with a new CA if empty (mount it read-only in production)")
    ca.set_defaults(command=_ca)

    rotate.add_parser(commands)

    keygen = commands.add_parser("keygen", help="write a new random 256-bit key file (mode 600)")
    keygen.add_argument("file", type=Path)
    keygen.set_defaults(command=_keygen)
    return parser


def _check(args) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    for line in policy.summary():
        print(line)
    return 0


def _ca(args) -> int:
    print(ensure_ca(args.confdir))
    return 0


def ensure_ca(confdir: Path) -> Path:
    """The CA certificate's path, creating the CA on first use (its private key stays in confdir)."""
    from mitmproxy import certs

    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    return confdir / CA_CERT_NAME


def _keygen(args) -> int:
    from keycourier.keys import generate_key_file

    try:
        generate_key_file(args.file)
    except FileExistsError:
        print(f"keycourier: {args.file} exists; not overwriting a key", file=sys.stderr)
        return 1
    print(f"keycourier: wrote a new key to {args.file} (mode 600)")
    return 0


def mode_problem(mode: str) -> str | None:
    """Why keycourier cannot run in `mode`: it polices HTTP, as a regular proxy or an HTTP(S) reverse proxy."""
    from mitmproxy.proxy import mode_specs

    try:
        spec = mode_specs.ProxyMode.parse(mode)
    except ValueError as exc:
        return str(exc)
    if isinstance(spec, mode_specs.RegularMode) or (isinstance(spec, mode_specs.ReverseMode) and spec.scheme in ("http", "https")):
        return None
    return "keycourier runs as a regular proxy (regular) or an HTTP(S) reverse proxy (reverse:https://host[:port])"


def _run(args) -> int:
    from keycourier.tls import upstream_trust_bundle

    try:
        load_policy(args.policies)
    except PolicyError as exc:
        print(f"keycourier: invalid policy: {exc}", file=sys.stderr)
        return 1
    problem = mode_problem(args.mode)
    if problem:
        print(f"keycourier: --mode {args.mode}: {problem}", file=sys.stderr)
        return 1
    ensure_ca(args.confdir)
    options = {
        "listen_host": args.listen_host,
        "listen_port": args.listen_port,
        "mode": [args.mode],
        "confdir": str(args.confdir),
        # Upstream certificates are always verified; --upstream-ca only adds trust.
        "ssl_verify_upstream_trusted_ca": str(upstream_trust_bundle(args.upstream_ca)),
        # Reverse mode: keep the Host the client signed; the pipeline sets the upstream's and re-signs.
        "keep_host_header": True,
        "keycourier_policies": str(args.policies),
        "keycourier_metrics": f"{args.metrics_host}:{args.metrics_port}",
        "keycourier_log_format": args.log_format,
    }
    if args.save_flows:
        options["save_stream_file"] = str(args.save_flows)
    return asyncio.run(_serve(options))


async def _serve(options: dict) -> int:
    from mitmproxy import addons as mitmproxy_addons
    from mitmproxy import master, optmanager
    from mitmproxy.addons import errorcheck
    from mitmproxy.options import Options

    from mitmproxy.addons.next_layer import NextLayer

    from keycourier.addons.keycourier import EndpointLayers, KeyCourier

    # As mitmdump does: the root logger passes everything, mitmproxy's terminal handler filters by verbosity.
    logging.getLogger().setLevel(logging.DEBUG)
    for noisy in ("asyncio", "hpack", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    proxy = master.Master(Options(), event_loop=asyncio.get_running_loop(), with_termlog=True)
    # keycourier first: it scrubs key headers before any other addon (save) sees a flow. No dumper:
    # keycourier's audit line replaces it, and unlike mitmproxy's it never prints object names.
    keycourier = KeyCourier()
    proxy.addons.add(keycourier)
    # keycourier decides the layers of every connection to a known host (never raw for an object store).
    proxy.addons.add(*(EndpointLayers(keycourier) if isinstance(addon, NextLayer) else addon
                       for addon in mitmproxy_addons.default_addons()))
    proxy.addons.add(errorcheck.ErrorCheck())
    try:
        proxy.options.update(**options)
    except optmanager.exceptions.OptionsError as exc:
        print(f"keycourier: {exc}", file=sys.stderr)
        return 1
    await proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
