"""Prometheus metrics and health, served by `meshagent run --metrics-addr`.

/metrics: a collector that reads the BPF maps at scrape time and the
forwarder's counters from a snapshot the event loop publishes once a second
(the HTTP thread never touches the loop's objects, so a scrape never stalls
forwarding). /healthz: the loop has turned within HEALTHY_SECONDS.
/readyz: programs attached and the control API up.

No client can hold the server: each connection has a thread of its own
(blocked in recv, it holds no GIL) and a total deadline (CLIENT_SECONDS
for the request and its reply, however slowly the bytes come); at most
MAX_CLIENTS are open, a new one cuts off the oldest. So a probe is answered
whatever other clients do, and close() never waits on one.

Names are meshagent_*, counters end in _total, sizes in _bytes; labels are
names (pod, reason, datapath), never addresses.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshagent import __version__
from meshagent.bpf.syscall import MapType
from meshagent.errors import MeshError

HEALTHY_SECONDS = 5.0
CLIENT_SECONDS = 10.0  # a request and its reply, in all (Prometheus' scrape timeout)
MAX_CLIENTS = 32  # connections open at once; the next one cuts off the oldest
REAP_SECONDS = 0.5  # how often the accepting thread cuts off clients past their deadline
# Map types whose entries the kernel counts in batches (BPF_MAP_LOOKUP_BATCH).
# Arrays always hold every slot; a ring buffer has no entries; a sockhash is
# counted by the forwarder.
COUNTED_MAP_TYPES = (MapType.HASH, MapType.LRU_HASH, MapType.LPM_TRIE)
WALK_AT_MOST = 1024  # entries: a map this small may be walked key by key
ATTACH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Collector:
    """Yields the metric families; `published` is the loop's latest snapshot
    (replaced whole, never mutated), `loaded` the BPF side (map syscalls are
    safe from any thread)."""

    def __init__(self, snapshot: Callable[[], dict], loaded) -> None:
        self.snapshot = snapshot
        self.loaded = loaded

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        if not snap:  # the agent is still starting: nothing counted yet
            return
        info = GaugeMetricFamily(
            "meshagent_build_info", "Version, kernel, backend and data path", labels=[
                "version", "kernel", "backend", "datapath"],
        )  # fmt: skip
        info.add_metric([__version__, snap["kernel"], snap["backend"], snap["datapath"]], 1)
        yield info
        conns = CounterMetricFamily(
            "meshagent_connections", "Forwarded connections by how they ended",
            labels=["pod", "datapath", "result"],
        )  # fmt: skip
        for (pod, datapath, result), count in sorted(snap["outcomes"].items()):
            conns.add_metric([pod, datapath, result], count)
        yield conns
        moved = CounterMetricFamily(
            "meshagent_bytes", "Bytes forwarded (finished connections)",
            labels=["pod", "direction", "datapath"],
        )  # fmt: skip
        for (pod, direction, datapath), count in sorted(snap["bytes"].items()):
            moved.add_metric([pod, direction, datapath], count)
        yield moved
        active = GaugeMetricFamily(
            "meshagent_active_connections", "Connections forwarded now", labels=["pod"]
        )
        for pod, count in sorted(snap["active"].items()):
            active.add_metric([pod], count)
        yield active
        waiting = GaugeMetricFamily(
            "meshagent_pod_waiting",
            "1 while the forwarder has no room for the pod's new connections (they wait)",
            labels=["pod"],
        )  # fmt: skip
        for pod, flag in sorted(snap.get("waiting", {}).items()):
            waiting.add_metric([pod], flag)
        yield waiting
        memory = snap.get("memory", {})
        yield GaugeMetricFamily(
            "meshagent_memory_budget_bytes",
            "Bytes forwarded connections may hold, all pods together (--memory-max)",
            value=memory.get("max", 0),
        )  # fmt: skip
        reserved = GaugeMetricFamily(
            "meshagent_memory_reserved_bytes",
            "Bytes of the memory budget a pod's connections hold now (each as much as its"
            " buffers let it hold)",
            labels=["pod"],
        )  # fmt: skip
        for pod, nbytes in sorted(memory.get("pods", {}).items()):
            reserved.add_metric([pod], nbytes)
        yield reserved
        errors = CounterMetricFamily(
            "meshagent_forwarder_errors", "Connections the forwarder could not carry",
            labels=["reason"],
        )  # fmt: skip
        for reason, count in sorted(snap["errors"].items()):
            errors.add_metric([reason], count)
        yield errors
        yield CounterMetricFamily(
            "meshagent_sockmap_handoff_bytes", "Bytes Python carried before the kernel spliced",
            value=snap["handoff_bytes"],
        )  # fmt: skip
        yield from _sockmap(snap.get("datapaths", {}).get("sockmap"))
        yield from _mesh(snap.get("mesh"))
        yield from self._bpf(snap)
        yield _histogram(snap["attach_seconds"])

    def _bpf(self, snap: dict) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.loaded is None:
            return
        decisions = CounterMetricFamily(
            "meshagent_decisions", "The BPF programs' decisions by reason", labels=["reason"]
        )
        for reason, by_direction in sorted(self.loaded.metrics().items()):
            decisions.add_metric([reason], sum(by_direction.values()))
        yield decisions
        entries = GaugeMetricFamily(
            "meshagent_bpf_map_entries",
            "Entries (counted by the kernel in batches; the sockhash by the forwarder)",
            labels=["map"],
        )
        capacity = GaugeMetricFamily("meshagent_bpf_map_capacity", "Max entries", labels=["map"])
        kept = snap["map_entries"]
        for name, mapfd in sorted(self.loaded.maps.items()):
            capacity.add_metric([name], mapfd.info.max_entries)
            count = kept.get(name)
            if count is None and mapfd.info.map_type in COUNTED_MAP_TYPES:
                count = mapfd.count_batched()
                if count is None and mapfd.info.max_entries <= WALK_AT_MOST:
                    count = len(mapfd.list_keys())  # a small map without batch lookup
            if count is not None:
                entries.add_metric([name], count)
        yield entries
        yield capacity


class ProcessStats:
    """The agent's own RSS, fds and CPU, as prometheus_client's
    ProcessCollector names them, without its listing of /proc/self/fd (at
    thousands of connections that listing is most of a scrape): since
    Linux 6.2 the size of /proc/self/fd is the number of open fds."""

    def collect(self) -> Iterator:
        import resource

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm", "rb") as statm:
            virtual, resident = (int(field) * page for field in statm.read().split()[:2])
        yield GaugeMetricFamily(
            "meshagent_process_resident_memory_bytes", "Resident memory", value=resident
        )
        yield GaugeMetricFamily(
            "meshagent_process_virtual_memory_bytes", "Virtual memory", value=virtual
        )
        yield GaugeMetricFamily("meshagent_process_open_fds", "Open fds", value=open_fds())
        yield GaugeMetricFamily(
            "meshagent_process_max_fds", "The fd limit",
            value=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )  # fmt: skip
        times = os.times()
        yield CounterMetricFamily(
            "meshagent_process_cpu_seconds", "User and system CPU time",
            value=times.user + times.system,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "meshagent_process_start_time_seconds", "When the agent started (Unix time)",
            value=STARTED,
        )  # fmt: skip


STARTED = time.time()


def _sockmap(stats: dict | None) -> Iterator:
    """The sockmap path's back-pressure (SockmapPath.snapshot), when the
    agent has that path (it needs the BPF verdict)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not stats:
        return
    yield CounterMetricFamily(
        "meshagent_sockmap_throttles", "Times the kernel held a spliced connection's bytes"
        " back (its budget reached)", value=stats.get("throttles", 0),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "meshagent_sockmap_throttled_connections", "Spliced connections held back now",
        value=stats.get("throttled_connections", 0),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "meshagent_sockmap_held_bytes", "Bytes held back that Python has not carried yet",
        value=stats.get("held_bytes", 0),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "meshagent_sockmap_budget_bytes", "Bytes a spliced connection may have on their way"
        " to a reader, per direction (--sockmap-budget)", value=stats.get("budget_bytes", 0),
    )  # fmt: skip


def _mesh(stats: dict | None) -> Iterator:
    """The mutual-TLS hop (mesh/node.py), when the agent is in a mesh."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not stats:
        return
    handshakes = CounterMetricFamily(
        "meshagent_mtls_handshakes", "Hops between nodes by direction (out: to another node,"
        " in: from one) and result (ok, or the reason it was refused)",
        labels=["direction", "result"],
    )  # fmt: skip
    for (direction, result), count in sorted(stats["handshakes"].items()):
        handshakes.add_metric([direction, result], count)
    yield handshakes
    hops = GaugeMetricFamily(
        "meshagent_mtls_connections", "Hops between nodes open now", labels=["direction"]
    )
    for direction in ("in", "out"):
        hops.add_metric([direction], stats["hops"].get(direction, 0))
    yield hops
    yield GaugeMetricFamily(
        "meshagent_mtls_certificate_expiry_seconds", "When this node's certificate ends"
        " (Unix time)", value=stats["cert_expiry"],
    )  # fmt: skip
    yield CounterMetricFamily(
        "meshagent_mtls_certificate_reloads", "Times new certificate files were taken up",
        value=stats["cert_reloads"],
    )  # fmt: skip


def open_fds() -> int:
    """This process's open fds: one stat() on Linux 6.2+, a listing before."""
    size = os.stat("/proc/self/fd").st_size
    return size if size > 0 else len(os.listdir("/proc/self/fd"))


def _histogram(observations: tuple[float, ...]):
    from prometheus_client.core import HistogramMetricFamily

    buckets = [[str(bound), sum(1 for o in observations if o <= bound)] for bound in ATTACH_BUCKETS]
    buckets.append(["+Inf", len(observations)])
    return HistogramMetricFamily(
        "meshagent_attach_seconds", "How long attaching a pod took",
        buckets=buckets, sum_value=sum(observations),
    )  # fmt: skip


class MetricsServer:
    """A small HTTP server: one thread accepts, each client has a thread of
    its own, bounded in number and in time."""

    def __init__(
        self,
        addr: tuple[str, int],
        collector: Collector,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        registry.register(ProcessStats())
        self.registry = registry
        handler = _handler(registry, healthy, ready)
        try:
            self.httpd = _Server(addr, handler)
        except OSError as exc:
            raise MeshError(
                f"cannot serve metrics on {addr[0]}:{addr[1]}: {exc.strerror};"
                " choose another --metrics-addr (or off)"
            ) from None
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(REAP_SECONDS,), name="metrics", daemon=True
        )
        self.thread.start()

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        """Stop accepting and cut off every client; never wait on one (the
        accepting thread only waits in select, for at most REAP_SECONDS)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.cut_all()
        self.thread.join(5)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open clients and a deadline each.
    Clients are cut off with shutdown(2) (which wakes their thread from
    recv or send); only a client's own thread closes its socket."""

    daemon_threads = True  # a client's thread never keeps the agent up
    block_on_close = False  # server_close() joins no client's thread
    request_queue_size = MAX_CLIENTS

    def __init__(self, addr, handler) -> None:
        self.clients: dict[socket.socket, float] = {}  # socket: deadline, oldest first
        self.clients_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address) -> None:
        with self.clients_lock:
            if len(self.clients) >= MAX_CLIENTS:
                oldest = next(iter(self.clients))
                del self.clients[oldest]
                _cut(oldest)
            self.clients[request] = time.monotonic() + CLIENT_SECONDS
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        """Between accepts (every REAP_SECONDS at most): the deadlines."""
        now = time.monotonic()
        with self.clients_lock:
            late = [sock for sock, deadline in self.clients.items() if deadline < now]
            for sock in late:
                del self.clients[sock]
                _cut(sock)

    def shutdown_request(self, request) -> None:
        with self.clients_lock:  # out of reach of a cut before it is closed
            self.clients.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A client that went away, or was cut off, is no error; anything
        else is one line in the log, never a traceback on stderr."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        from meshagent import log

        log.get().warning(
            "metrics request failed", extra={"reason": f"{type(exc).__name__}: {exc}"}
        )

    def cut_all(self) -> None:
        with self.clients_lock:
            for sock in self.clients:
                _cut(sock)
            self.clients.clear()


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def _handler(registry, healthy, ready):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        # Each recv or send at most this long (the server's reaper enforces
        # the total deadline; this holds if the reaper has stopped).
        timeout = CLIENT_SECONDS

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = healthy()
                self._send(200 if ok else 503, b"ok\n" if ok else b"the loop is stuck\n")
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"starting\n")
            else:
                self._send(404, b"/metrics, /healthz or /readyz\n")

        def _send(self, code: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:  # no access log on stderr
            pass

    return Handler


def healthy_since(heartbeat: Callable[[], float]) -> Callable[[], bool]:
    return lambda: time.monotonic() - heartbeat() < HEALTHY_SECONDS
