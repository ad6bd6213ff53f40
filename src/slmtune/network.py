"""Where a network address points: safe-by-default checks shared by the server and the endpoint generator."""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlparse


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_is_local(url: str) -> bool:
    """Whether an http(s) URL points at this machine."""
    return is_loopback(urlparse(url).hostname or "")


def offline() -> bool:
    """Whether the pipeline runs offline (HF_HUB_OFFLINE, on unless set to 0/false): going online is explicit."""
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no")
