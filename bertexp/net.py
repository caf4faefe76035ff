"""Is a server there? One bounded probe for every online service bertexp talks to (W&B, the Hugging Face Hub),
so that no run waits on a network that does not answer."""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def connect_error(url: str, timeout: float) -> str | None:
    """Why a TCP connection to `url`'s host cannot be made within `timeout` seconds, or None when it can. The
    name lookup and the connect run in a daemon thread, so a dead name server cannot stretch the wait either.
    Behind a proxy (HTTPS_PROXY and the like) the host is reached through it, not directly: not probed."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer from {host} within {timeout:g} s"
