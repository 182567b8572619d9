"""Is the Hugging Face hub (timm's source of pretrained weights) reachable? Fail fast when it is not.

Offline, timm's download retries every file for tens of seconds before it gives up. Before a
download, :func:`hub_unreachable` makes one TCP connection to the hub endpoint (or the proxy
the environment names for it) with a short time-out; when it fails, :func:`hub_offline` puts
``huggingface_hub`` in offline mode for the one call, so cached weights load at once and
missing ones fail at once. Nothing here runs at import.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["PROBE_SECONDS", "hub_unreachable", "hub_offline"]

PROBE_SECONDS = 3.0  # how long the hub gets to answer before its weights count as unreachable
_OFFLINE_LOCK = threading.Lock()


def hub_unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it can (or when this cannot be
    told: ``huggingface_hub`` is not installed).

    One TCP connection to the endpoint (``HF_ENDPOINT``), or to the proxy the environment names
    for its scheme, within ``timeout`` seconds, name lookup included (it runs in a thread that
    is abandoned on time-out).
    """
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    t = threading.Thread(target=probe, name="imret-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {timeout:g} s"


@contextlib.contextmanager
def hub_offline(on: bool) -> Iterator[None]:
    """``huggingface_hub`` in offline mode for the block when ``on`` (its flag is restored after).

    timm has no per-call switch, so this sets the library's module-level flag; a lock keeps two
    threads of imret from interleaving it.
    """
    if not on:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    with _OFFLINE_LOCK:
        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = before
