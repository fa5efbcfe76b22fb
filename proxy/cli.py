"""The `keycourier` command: run the proxy, check a policy, show or import the CA, make a key."""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from keycourier import __version__, rotate
from keycourier.policy import PolicyError, load_policy
from keycourier.workers import MULTIPROC_ENV, Supervisor, readiness_file, worker_count

DEFAULT_CONFDIR = Path("~/.keycourier").expanduser()
DEFAULT_DRAIN_SECONDS = 25.0
log = logging.getLogger("keycourier")


class CliError(Exception):
    """Ends the command with `keycourier: <message>` on stderr and exit code 1, no traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.raw_argv = argv
    try:
        return args.command(args)
    except CliError as exc:
        print(f"keycourier: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keycourier", description=__doc__)
    parser.add_argument("--version", action="version", version=f"keycourier {__version__}")
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
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="every log line on stderr as text or as one JSON object")
    run.add_argument("--verbose", action="store_true", help="also log each connection's connect and disconnect")
    run.add_argument("--workers", default="1", help="proxy processes sharing the listening port (auto: one per core)")
    run.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # set by the --workers supervisor
    run.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS,
                     help="on SIGTERM, how long requests in flight may take to finish before keycourier exits")
    run.set_defaults(command=_run)

    check = commands.add_parser("check", help="validate a policy file: every error, and warnings")
    check.add_argument("file", type=Path)
    check.set_defaults(command=_check)

    ca = commands.add_parser("ca", help="print the path of the CA certificate clients must trust")
    ca.add_argument("--confdir", "--generate", type=Path, default=DEFAULT_CONFDIR,
                    help="the CA's directory; created with a new CA if empty (mount it read-only in production)")
    ca.add_argument("--import", dest="import_files", nargs=2, type=Path, metavar=("CERT", "KEY"),
                    help="use this CA (PEM certificate, then chain; PEM private key) instead of generating one")
    ca.set_defaults(command=_ca)

    rotate.add_parser(commands)

    keygen = commands.add_parser("keygen", help="write a new random 256-bit key file (mode 600)")
    keygen.add_argument("file", type=Path)
    keygen.set_defaults(command=_keygen)
    return parser


def _check(args) -> int:
    from keycourier.checks import warnings

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    for line in policy.summary():
        print(line)
    for warning in warnings(policy):
        print(warning, file=sys.stderr)
    return 0


def _ca(args) -> int:
    if args.import_files:
        from mitmproxy.certs import DEFAULT_DHPARAM

        from keycourier.ca import CaError, import_ca

        try:
            print(import_ca(*args.import_files, args.confdir, DEFAULT_DHPARAM))
        except (CaError, OSError) as exc:
            raise CliError(f"ca --import: {exc}") from None
        return 0
    print(ensure_ca(args.confdir))
    return 0


def ensure_ca(confdir: Path) -> Path:
    """The CA certificate's path, creating the CA on first use (its private key stays in confdir)."""
    from mitmproxy import certs

    from keycourier.ca import CA_CERT_FILE

    try:
        confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot use the CA in {confdir}: {type(exc).__name__}: {exc}") from None
    return confdir / CA_CERT_FILE


def _keygen(args) -> int:
    from keycourier.keys import generate_key_file

    try:
        generate_key_file(args.file)
    except FileExistsError:
        raise CliError(f"{args.file} exists; not overwriting a key") from None
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
        raise CliError("invalid policy:\n" + "\n".join(str(error) for error in exc.errors)) from None
    problem = mode_problem(args.mode)
    if problem:
        raise CliError(f"--mode {args.mode}: {problem}")
    if args.drain_seconds < 0:
        raise CliError("--drain-seconds must be >= 0")
    try:
        workers = worker_count(args.workers)
    except ValueError:
        raise CliError(f"--workers {args.workers}: a number of processes, or auto") from None
    if args.worker_of is None:  # a worker's ports are bound by its siblings, its CA made by its supervisor
        for what, host, port in (("listen on", args.listen_host, args.listen_port),
                                 ("serve metrics on", args.metrics_host, args.metrics_port)):
            _check_port_free(what, host, port)
        ensure_ca(args.confdir)
    if workers > 1 and args.save_flows:
        raise CliError("--save-flows with --workers: the workers would write over one another's flows; save flows with one")
    if workers > 1:
        return Supervisor(_worker_argv(args), workers, args.metrics_host, args.metrics_port).run()
    with tempfile.TemporaryDirectory(prefix="keycourier-") as private:
        try:
            trust = upstream_trust_bundle(args.upstream_ca, Path(private))
        except OSError as exc:
            raise CliError(f"--upstream-ca {args.upstream_ca}: {exc.strerror}") from None
        options = {
            "listen_host": args.listen_host,
            "listen_port": args.listen_port,
            "mode": [args.mode],
            "confdir": str(args.confdir),
            # Upstream certificates are always verified; --upstream-ca only adds trust.
            "ssl_verify_upstream_trusted_ca": str(trust),
            # Reverse mode: keep the Host the client signed; the pipeline sets the upstream's and re-signs.
            "keep_host_header": True,
            "keycourier_policies": str(args.policies),
            "keycourier_metrics": "" if args.worker_of else f"{args.metrics_host}:{args.metrics_port}",
            "keycourier_ready_file": str(readiness_file(os.environ.get(MULTIPROC_ENV)) or "") if args.worker_of else "",
            "keycourier_log_format": args.log_format,
        }
        if args.save_flows:
            options["save_stream_file"] = str(args.save_flows)
        return asyncio.run(_serve(options, args))


def _worker_argv(args) -> list[str]:
    """The command line of one worker: this one's, as one process."""
    argv, skip = [], False
    for word in args.raw_argv:
        if skip:
            skip = False
        elif word == "--workers":
            skip = True
        elif not word.startswith("--workers="):
            argv.append(word)
    return argv


def _check_port_free(what: str, host: str, port: int) -> None:
    """A busy port as one line now, rather than a traceback once mitmproxy or the metrics server binds it."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as both servers bind
            probe.bind((host, port))
    except OSError as exc:
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise CliError(f"cannot {what} {host}:{port}: {reason}") from None


async def _serve(options: dict, args) -> int:
    from mitmproxy import master, optmanager
    from mitmproxy.options import Options

    from keycourier import logs
    from keycourier.addons.chain import chain
    from keycourier.addons.drain import Drain
    from keycourier.addons.keycourier import KeyCourier

    # keycourier's handler prints every library's lines (mitmproxy's terminal log is not loaded);
    # the root logger passes everything at INFO and above to it.
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("asyncio", "hpack", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logs.install()
    handler = logs.log_to_stream(sys.stderr, args.log_format, verbose=args.verbose)
    if args.worker_of:
        _share_the_listening_port(args.worker_of)
    try:
        proxy = master.Master(Options(), event_loop=asyncio.get_running_loop())
        keycourier = KeyCourier()
        drain = Drain(keycourier, args.drain_seconds)
        proxy.addons.add(*chain(keycourier, drain))
        try:
            proxy.options.update(**options)
        except optmanager.exceptions.OptionsError as exc:
            raise CliError(str(exc)) from None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, drain.begin)
        loop.run_in_executor(None, _warn_unreadable, keycourier)
        await proxy.run()
    finally:
        logging.getLogger().removeHandler(handler)
    return 0


def _share_the_listening_port(supervisor: int) -> None:
    """A --workers worker: mitmproxy binds its listener with asyncio.start_server; with SO_REUSEPORT the workers
    bind the same port and the kernel spreads connections over them. A worker whose supervisor is gone stops."""
    import functools
    import threading

    asyncio.start_server = functools.partial(asyncio.start_server, reuse_port=True)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="keycourier-supervisor-watch", daemon=True).start()


def _warn_unreadable(keycourier) -> None:
    """One warning line for each key or credential that cannot be read now (requests needing it will be refused)."""
    policy = keycourier.policy_file.current
    for reason in keycourier.secrets.unreadable(policy):
        log.warning(f"not available, requests that need it will be refused: {reason}")


if __name__ == "__main__":
    sys.exit(main())
