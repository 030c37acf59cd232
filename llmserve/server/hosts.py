"""Which `Host` headers the server answers: protection against DNS rebinding.

A web page can point a name it controls at 127.0.0.1 and then talk to a server on the
visitor's machine as a "same-origin" site; the only trace is the page's own name in the
`Host` header. So a server bound to a loopback address answers only loopback names
(any port) unless told otherwise; one bound elsewhere answers any name.
"""

from __future__ import annotations

import ipaddress

ANY_HOST = "*"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_host_names(bind_host: str, allowed_hosts: tuple[str, ...] | None) -> frozenset[str] | None:
    """The host names to answer (None: any) for a server bound to `bind_host`; `allowed_hosts` None means
    the default: loopback names when bound to loopback, else any."""
    if allowed_hosts is None:
        return frozenset(map(host_name, (*LOOPBACK_NAMES, bind_host))) if is_loopback(bind_host) else None
    if ANY_HOST in allowed_hosts:
        return None
    return frozenset(map(host_name, allowed_hosts))


def is_loopback(host: str) -> bool:
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """`host` without its port, brackets and trailing dot, lower-cased: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_allowed(host_header: str | None, names: frozenset[str] | None) -> bool:
    """Whether a request with this Host header may be answered; a request without one is not from a
    browser (browsers always send it), so it cannot be a rebinding attack."""
    return names is None or not host_header or host_name(host_header) in names
