"""One HTTP probe, as a kubelet makes it: its timeout bounds every blocking
call, so a server that does not answer raises TimeoutError."""

from __future__ import annotations

import http.client

PROBE_TIMEOUT = 2.0  # seconds (a kubelet's default is 1 s)


def probe(address: str, path: str = "/healthz", timeout: float = PROBE_TIMEOUT) -> int:
    """The status of GET path at host:port."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()
