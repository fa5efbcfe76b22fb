"""The addons `keycourier run` loads: keycourier's own, and of mitmproxy's only those it needs.

mitmproxy calls every hook on every loaded addon for every flow (and an update hook after each), so each of
its 31 default addons costs on every small request even when its options leave it idle: loading the 8 that
keycourier needs saves about a fifth of the CPU per request (benchmarks/small_requests.py). The rest serve
mitmproxy's own features, which `keycourier run` offers no option for: the onboarding app at mitm.it
(`keycourier ca` prints the CA instead), scripts, replay, map/modify rules, sticky cookies, HAR export, DNS mode.
"""
from __future__ import annotations

from mitmproxy.addons import block, core, disable_h2c, proxyserver, save, tlsconfig, update_alt_svc

from keycourier.addons.drain import Drain, ExitOnStartupError
from keycourier.addons.keycourier import EndpointLayers, KeyCourier


def chain(keycourier: KeyCourier, drain: Drain) -> list:
    """keycourier first: it scrubs key headers before any other addon (save) sees a flow. No dumper: keycourier's
    audit line replaces it, and unlike mitmproxy's it never prints object names."""
    return [
        keycourier,
        drain,
        core.Core(),  # option checks and mitmproxy's commands
        block.Block(),  # refuses clients from public addresses unless block_global is off
        disable_h2c.DisableH2C(),  # no h2c upgrade: an object store's connection stays HTTP/1 or h2
        proxyserver.Proxyserver(),
        EndpointLayers(keycourier),  # mitmproxy's layer decisions, but keycourier's for a known host's connection
        save.Save(),  # --save-flows
        tlsconfig.TlsConfig(),
        update_alt_svc.UpdateAltSvc(),  # reverse mode: Alt-Svc names keycourier, not the upstream
        ExitOnStartupError(),
    ]
