"""Is a server open to other machines without a key? One check for the API and the web UI, so both warn alike."""

from __future__ import annotations

import ipaddress
import sys


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any address
        return False


def warn_if_exposed(host: str, api_key: str | None, what: str) -> str | None:
    """Print (to stderr) and return a warning when `what`, bound to `host`, is reachable beyond loopback with no key."""
    if api_key or is_loopback(host):  # an empty key guards nothing: the header 'Bearer ' passes it
        return None
    message = (f"warning: {what} listens on {host} without an API key: anyone who can reach this address can use "
               "the model and your compute. Set --api-key KEY, or bind to 127.0.0.1.")
    print(message, file=sys.stderr)
    return message
