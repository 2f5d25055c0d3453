"""The agent: probes the machine, asks the plan what to use, loads what the
plan names, serves the control API and runs the forwarder.

Everything started is registered on one ExitStack at once, so SIGTERM, an
error half-way through start, or a normal stop all unwind the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from contextlib import ExitStack
from pathlib import Path

from meshagent import kernel, log
from meshagent.attachments import Attachments
from meshagent.bpf.loader import Loaded
from meshagent.config import AgentConfig
from meshagent.control import ControlServer, Request
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.host import cgroup
from meshagent.host.loop import Loop
from meshagent.host.worker import Worker
from meshagent.modes import Backend, DataPathMode
from meshagent.plan import Plan, plan
from meshagent.redirect import Backend as RedirectBackend

SWEEP_SECONDS = 1.0


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        from meshagent.pods.store import PodStore

        self.cfg = cfg
        self.log = log.get()
        self.store = PodStore(cfg.state_dir)
        self.loop = Loop()
        self.stack = ExitStack()
        self.probe: kernel.Probe | None = None
        self.plan: Plan | None = None
        self.loaded: Loaded | None = None
        self.backends: dict[Backend, RedirectBackend] = {}
        self.forwarder: Forwarder | None = None
        self.pods: Attachments | None = None
        self.kube = None  # kube/pods.py: which Kubernetes pods to attach
        self.watch = None  # kube/watch.py: the API watch, when configured
        self.cgroup_path: Path | None = None
        self.datapath_reason = ""
        self.started = time.time()
        self.ready = False
        self.heartbeat = time.monotonic()  # the loop's last turn (for /healthz)
        self.published: dict = {}  # the loop's counters, for the metrics thread
        self.metrics = None
        self.tracer = None  # the running `meshagent trace`, if any
        self.reader: Worker | None = None
        self.adopted: list[str] = []  # pods taken over from an earlier agent
        self.handing_over = False  # a successor is receiving our pods and connections
        self.handed_over = False  # ... and has them: exit without ending any
        self.took_over: dict = {}  # --takeover: what the predecessor handed over

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise MeshError("meshagent run needs root (BPF, network namespaces)")
        from meshagent.host import caps

        lacking = caps.missing()
        if lacking:
            raise MeshError(
                f"meshagent run lacks {', '.join(lacking)}; it needs cap_sys_admin and"
                " cap_net_admin, nothing else"
            )
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from meshagent.forwarder import build_paths
        from meshagent.forwarder.sockmap_maps import SockmapMaps

        self.stack.callback(self.loop.close)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        takeover = self.cfg.takeover
        if takeover:  # the running agent holds the lock, the socket and the port
            self.store.check_safe()
            from meshagent import control as ctl

            if not ctl.agent_running(self.cfg.socket_path):
                raise MeshError(
                    f"--takeover: no agent runs at {self.cfg.socket_path}; start without it"
                )
        else:
            self._lock_state_dir()
            self._serve_metrics()
        _raise_fd_limit()
        self.cgroup_path = cgroup.resolve(self.cfg.cgroup)
        self.probe = kernel.probe(self.cfg.without, self.cfg.iptables)
        self.plan = self._load()
        if not takeover:
            self._serve_control()
        self._make_backends()
        maps = SockmapMaps(self.loaded) if self.plan.sockmap else None
        modes = tuple(
            m for m in DataPathMode if m is not DataPathMode.SPLICE or self.probe.has("splice")
        )

        def paths(loop: Loop):
            msg = self.plan.msg and self.cfg.sockmap_msg
            return build_paths(loop, modes, maps, self.cfg.sockmap_sndbuf, msg)

        mode = self._choose_datapath(paths)
        self.forwarder = Forwarder(
            self.loop, self.cfg.port, paths(self.loop), mode, self.cfg.pod_conns_max
        )
        self._make_pods()
        # Unwound in reverse: the pods stay attached for the next agent (their
        # new connects go direct meanwhile), forwarded connections close, the
        # rules kept for draining pods go.
        self.stack.callback(self.pods.finish_draining, everything=True)
        self.stack.callback(self.forwarder.close)
        self.stack.callback(self.pods.suspend_all)
        if takeover:
            from meshagent import takeover as handover

            self.took_over = handover.receive(self)  # the old agent has exited now
            self.log.info(
                "took over from the running agent",
                extra={"reason": f"pid {self.took_over['from_pid']}: {self.took_over['pods']}"
                       f" pods, {self.took_over['conns']} connections"},
            )  # fmt: skip
            self._lock_state_dir(wait=handover.EXIT_WAIT)
            self._serve_metrics()
            self._serve_control()
        self.adopted = self.pods.adopt()
        self.kube.reconcile()  # CNI records of pods to attach that came while no agent ran
        if self.watch is not None:
            self.watch.start()
            self.stack.callback(self.watch.close)
        self.pods.start_offloading()
        self.reader = Worker(self.loop, "reader")  # whole-map walks for status
        self.stack.callback(self.reader.close)
        self.stack.callback(self.pods.stop_offloading)  # first: queued rule work ends
        self._publish()
        self.loop.call_later(SWEEP_SECONDS, self._sweep)
        self._write_info()
        self.stack.callback(self._info_path().unlink, missing_ok=True)
        self._install_signals()
        self.ready = True
        self.log.info(
            "agent ready",
            extra={
                "reason": f"backend={self.plan.backend} datapath={mode}"
                f" cgroup={self.cgroup_path} socket={self.cfg.socket_path}"
            },
        )

    def _make_pods(self) -> None:
        """The attachments, the pod resolver and the Kubernetes side (CNI
        records always; the API watch when configured)."""
        from meshagent.kube.pods import KubePods
        from meshagent.kube.watch import ApiWatch, settings
        from meshagent.pods.resolve import Resolver

        resolver = Resolver(self.store)
        self.pods = Attachments(
            self.store, self.forwarder, self.backends, self.plan.backend, resolver
        )
        self.kube = KubePods(self.pods, resolver.cni)
        resolver.uid_of = self.kube.uid_of
        kube_cfg = settings(self.cfg.kubeconfig, self.cfg.node_name, self.cfg.kube)
        if kube_cfg is not None:
            self.watch = ApiWatch(self.loop, self.kube, kube_cfg)
            self.kube.watching = True

    def _serve_control(self) -> None:
        control = ControlServer(self.loop, self.cfg.socket_path, self.dispatch)
        self.stack.callback(control.close)

    def _serve_metrics(self) -> None:
        """Up before anything is loaded, so /readyz says 503 until it is."""
        from meshagent.metrics import Collector, MetricsServer, healthy_since, parse_addr

        addr = parse_addr(self.cfg.metrics_addr)
        if addr is None:
            return
        collector = Collector(lambda: self.published, None)
        self.metrics = MetricsServer(
            addr, collector, healthy_since(lambda: self.heartbeat), lambda: self.ready
        )
        self.stack.callback(self.metrics.close)
        self._collector = collector

    def _publish(self) -> None:
        """The loop's counters, copied for the metrics thread (once a second)."""
        self.heartbeat = time.monotonic()
        if self.metrics is None:
            return
        self._collector.loaded = self.loaded
        self.published = {
            **self.forwarder.counters(),
            "kernel": self.probe.kernel,
            "backend": self.plan.backend.value if self.plan.backend else "none",
            "datapath": self.forwarder.mode.value,
            "attach_seconds": tuple(self.pods.attach_seconds),
        }

    def _lock_state_dir(self, wait: float = 0.0) -> None:
        """One agent per state dir, also when two start at the same moment
        (the socket check alone is a race): an flock held for the agent's life."""
        import fcntl

        self.store.check_safe()
        path = self.cfg.state_dir / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
            os.close(fd)
            raise MeshError(
                f"another agent runs with state dir {self.cfg.state_dir}: stop it first,"
                " or use another --state-dir"
            ) from None
        # The file stays: unlinked, a successor's lock on it would be on an
        # orphan and a third agent could lock a new one (cleanup removes it).
        self.stack.callback(os.close, fd)

    def _load(self) -> Plan:
        """Plan, then load what the plan names. A program the kernel refuses
        (or a compile that fails) becomes a fact of the probe and the plan
        is asked again: auto falls through, an explicit choice says why."""
        from meshagent.bpf import loader, objects

        objects.check_cache_dir(self.cfg.cache_dir)  # unsafe: refuse, never fall back
        from meshagent.bpf.pins import Pins

        pins = Pins(self.cfg.state_dir)
        current = plan(self.probe, self.cfg)
        if current.error:
            raise MeshError(current.error)
        if not current.programs:
            if pins.exists():  # an earlier agent's hooks: this one does not run them
                pins.remove()
            return current
        maps, fds, refused = loader.load_programs(self.cfg, current.programs, current.cflags, pins)
        try:
            if refused:
                current = self._replan(refused)
                wanted = {program.name for program in current.programs}
                for name in [n for n in fds if n not in wanted]:
                    os.close(fds.pop(name))
        except BaseException:
            loader.release(maps, fds)
            raise
        if fds:
            self.loaded = loader.attach(fds, maps, self.cgroup_path, pins)
            self.stack.callback(self.loaded.close)
        else:
            loader.release(maps, fds)
            if pins.exists():
                pins.remove()
        return current

    def _replan(self, refused: dict[str, str]) -> Plan:
        for name, reason in refused.items():
            self.log.warning(f"BPF program {name} unavailable", extra={"reason": reason})
        self.probe = self.probe.with_refused(refused)
        again = plan(self.probe, self.cfg)
        if again.error:
            raise MeshError(again.error)
        return again

    def _make_backends(self) -> None:
        from meshagent.redirect.ebpf import EbpfBackend

        if Backend.EBPF in self.plan.backends:
            self.backends[Backend.EBPF] = EbpfBackend(
                self.loaded, self.cfg.port, self.cfg.exclude_ports, self.cfg.exclude_cidrs
            )
        if Backend.IPTABLES in self.plan.backends:
            self.backends[Backend.IPTABLES] = self._iptables_backend()

    def _iptables_backend(self):
        from meshagent.redirect.iptables import IptablesBackend, Tools
        from meshagent.redirect.rules import RuleConfig

        backend = IptablesBackend(
            RuleConfig(
                self.cfg.port, self.cfg.skip_mark, self.cfg.exclude_ports, self.cfg.exclude_cidrs
            ),
            Tools.of(self.probe.iptables_flavour),
        )
        # Rules an earlier agent left: adopt() takes over the pods of
        # attached.json and removes the rest (a pod being attached or
        # detached when it crashed is there too).
        return backend

    def _choose_datapath(self, paths) -> DataPathMode:
        from meshagent.forwarder import selftest

        candidates = self.plan.datapaths
        if len(candidates) > 1:
            mode, why = selftest.choose(candidates, paths)
            self.datapath_reason = f"{self.plan.datapath_reason}; {why}"
        else:
            mode, self.datapath_reason = candidates[0], self.plan.datapath_reason
        self.log.info(f"data path {mode}", extra={"reason": self.datapath_reason})
        return mode

    def _sweep(self) -> None:
        """Once a second: rules of drained pods go, vanished pods are
        forgotten, each data path's upkeep."""
        self.pods.finish_draining()
        self.pods.drop_vanished()
        self.kube.retry_pending()
        self.forwarder.tick()
        self._publish()
        self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def set_datapath(self, mode: DataPathMode, msg: bool | None = None) -> dict:
        if msg is not None:
            sockmap = self.forwarder.paths.get(DataPathMode.SOCKMAP)
            if mode is not DataPathMode.SOCKMAP or sockmap is None:
                raise MeshError("--msg/--no-msg: only with `datapath set sockmap`")
            if msg and not self.plan.msg:
                raise MeshError(
                    "--msg: this agent has no sk_msg path (ebpf backend, kernel 5.15+;"
                    " see `meshagent probe-kernel`)"
                )
            sockmap.msg = msg
        self.forwarder.set_mode(mode)
        self.datapath_reason = "set while running (`meshagent datapath set`)"
        self.log.info(f"data path {mode} for new connections", extra={"reason": "datapath set"})
        return {"datapath": mode.value}

    def _info_path(self) -> Path:
        return self.cfg.state_dir / "agent.json"

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "cgroup": str(self.cgroup_path), "port": self.cfg.port}
        self._info_path().write_text(json.dumps(info) + "\n")

    def _install_signals(self) -> None:
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        old_fd = signal.set_wakeup_fd(wfd.fileno())
        handlers = {
            sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)
        }

        def restore() -> None:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)
            self.loop.remove(rfd.fileno())
            rfd.close()
            wfd.close()

        self.stack.callback(restore)

        def on_signal(_events: int) -> None:
            try:
                data = rfd.recv(64)
            except BlockingIOError:
                return
            if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
                self.log.info("signal received; stopping")
                self.loop.stop()

        self.loop.add(rfd.fileno(), 1, on_signal)

    def run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        self.stack.close()
        if self.ready:
            self.ready = False
            self.log.info(
                "agent stopped",
                extra={
                    "reason": f"{len(self.pods.attached()) if self.pods else 0} pods stay attached"
                    " for the next agent; `meshagent cleanup` removes everything"
                },
            )

    # -- the control API -----------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "pid": os.getpid(),
            "cgroup": str(self.cgroup_path),
            "port": self.cfg.port,
            "exclude_ports": list(self.cfg.exclude_ports),
            "exclude_cidrs": list(self.cfg.exclude_cidrs),
            "without": list(self.cfg.without),
            "uptime_seconds": round(time.time() - self.started, 1),
            **_own_footprint(),
            "datapath_reason": self.datapath_reason,
            "loop_errors": self.loop.errors,
            "loop_dispatched": self.loop.dispatched,
            "metrics_addr": self.metrics.address if self.metrics else None,
            "tracing": self.tracer is not None,
            "adopted_pods": self.adopted,
            "took_over": self.took_over,
            "kube": {
                **(self.kube.snapshot() if self.kube else {}),
                **({"api": self.watch.snapshot()} if self.watch else {}),
            },
        }

    def dispatch(self, request: Request) -> dict:
        op = request.op()
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "attach":
            redirect = request.choice("redirect", Backend, optional=True)
            return self.pods.attach(
                request.text("pod"),
                redirect,
                request.optional_text("netns"),
                request.optional_int("pid"),
            )
        if op == "detach":
            return self.pods.detach(request.text("pod"))
        if op == "cni-add":
            return self.kube.cni_add(_kube_name(request.text("pod")))
        if op == "cni-del":
            return self.kube.cni_del(_kube_name(request.text("pod")))
        if op == "status":
            from meshagent.status import agent_status

            return agent_status(self)
        if op == "trace":
            from meshagent import tracing

            return tracing.start(self, request)
        if op == "connections":
            return {"connections": self.forwarder.connections()}
        if op == "handover":
            from meshagent import takeover

            return takeover.serve(self, request)
        if op == "datapath":
            mode = request.choice("set", DataPathMode, optional=True)
            msg = request.optional_bool("msg")
            if mode is not None:
                return self.set_datapath(mode, msg)
            return {"datapath": self.forwarder.mode.value, "reason": self.datapath_reason}
        raise MeshError(f"unknown request {op!r}")


def _kube_name(name: str) -> str:
    from meshagent.pods.kube import split_name

    split_name(name)
    return name


def _own_footprint() -> dict:
    """The agent's own RSS and open fds (for `status`)."""
    from meshagent.metrics import open_fds

    with open("/proc/self/statm", "rb") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_bytes": rss, "open_fds": open_fds()}


def _raise_fd_limit() -> None:
    """Each forwarded connection holds two fds: lift the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


GIL_SWITCH_SECONDS = 0.0005


def run(cfg: AgentConfig) -> None:
    import faulthandler
    import gc
    import sys

    faulthandler.enable()  # a crash in native code (BCC, ssl) leaves every thread's stack
    log.setup(cfg.log_format)
    # The loop shares the GIL with the metrics thread; when the loop wakes
    # while a scrape holds the GIL it waits up to this long (Python's
    # default is 5 ms; bench/scrape.py measures the difference).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    agent = Agent(cfg)
    agent.start()
    # Everything made while starting (BCC, the plan, the modules) lives as
    # long as the agent: out of the collector's sight, a full collection
    # walks only the connections' objects.
    gc.freeze()
    try:
        agent.run()
    finally:
        agent.stop()
