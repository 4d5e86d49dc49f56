"""Run Flower's SuperLink with its HTTPS server restricted to TLS 1.3.

Flower 1.42 serves the Fleet, Control and ServerAppIo APIs through uvicorn, whose TLS context accepts
TLS 1.2 and 1.3; Flower exposes no setting for the minimum version. This launcher wraps uvicorn's own
context factory so that every context it builds refuses anything below TLS 1.3, then runs Flower's
``flower-superlink`` entry point unchanged (same arguments). ``medsilo server start`` uses it.
"""

from __future__ import annotations

import ssl
import sys
from typing import Any

import uvicorn.config

_create_ssl_context = uvicorn.config.create_ssl_context


def tls13_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
    """Build uvicorn's server context with TLS 1.3 as the minimum protocol version."""
    context = _create_ssl_context(*args, **kwargs)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def main() -> int:
    """``python -m server.tls13 <flower-superlink arguments>``."""
    uvicorn.config.create_ssl_context = tls13_context
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
