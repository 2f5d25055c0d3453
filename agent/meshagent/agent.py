"""The agent: picks and loads the redirect backends and the data path,
serves the control API, runs the forwarder.

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
from dataclasses import dataclass
from pathlib import Path

from meshagent import cgroup, kernel, log, netns
from meshagent.config import AgentConfig
from meshagent.control import ControlServer
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.forwarder.loop import Loop
from meshagent.redirect import Backend, PodHandle


@dataclass
class Attached:
    handle: PodHandle
    backend: str
    netns_fd: int
    since: float


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        from meshagent.pods.store import PodStore

        self.cfg = cfg
        self.log = log.get()
        self.store = PodStore(cfg.state_dir)
        self.loop = Loop()
        self.stack = ExitStack()
        self.attached: dict[str, Attached] = {}
        self.draining: dict[str, Attached] = {}  # detached, rules kept until conns close
        self.backends: dict[str, Backend] = {}
        self.default_backend = ""
        self.backend_reason = ""
        self._next_pod_id = 1
        self.datapath = None  # the BCC-loaded programs, if any
        self.probe: kernel.Probe | None = None
        self.forwarder: Forwarder | None = None
        self.cgroup_path: Path | None = None
        self.started = time.time()
        self.ready = False
        self.datapath_reason = ""
        self._sweep_failures = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise MeshError("meshagent run needs root (BPF, network namespaces)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.stack.callback(self.loop.close)
        _raise_fd_limit()
        self.cgroup_path = cgroup.resolve(self.cfg.cgroup)
        self.probe = kernel.probe(self.cfg.without, self.cfg.iptables)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        control = ControlServer(self.loop, self.cfg.socket_path, self.dispatch)
        self.stack.callback(control.close)
        self._load_backends()
        from meshagent.forwarder.sockmap import SockmapMaps

        sockmap_ok = self.datapath is not None and not self.datapath.sockmap_error
        self.forwarder = Forwarder(
            self.loop,
            self.cfg.skip_mark,
            self.cfg.port,
            maps=SockmapMaps(self.datapath) if sockmap_ok else None,
            sockmap_sndbuf=self.cfg.sockmap_sndbuf,
        )
        self._choose_datapath()
        self.stack.callback(self._detach_all)
        self._write_info()
        self.stack.callback(self._info_path().unlink, missing_ok=True)
        self._install_signals()
        self.ready = True
        self.log.info(
            "agent ready",
            extra={
                "reason": f"backend={self.default_backend} datapath={self.forwarder.mode}"
                f" cgroup={self.cgroup_path} socket={self.cfg.socket_path}"
            },
        )

    def _load_backends(self) -> None:
        """ebpf when the kernel has it (or asked for), iptables when installed;
        BCC compiles only when the ebpf hooks or the sockmap verdict are used."""
        from meshagent.bpf import load
        from meshagent.redirect.ebpf import EbpfBackend

        probe, wanted = self.probe, self.cfg.redirect
        ebpf_missing = probe.missing(kernel.EBPF_NEEDS)
        if wanted == "ebpf" and ebpf_missing:
            if "kernel_headers" in ebpf_missing:
                kernel.require_headers()  # says which, and the fix
            if "bcc" in ebpf_missing:
                raise MeshError(
                    "--redirect ebpf: BCC is not installed (python3-bpfcc): run scripts/bootstrap"
                )
            raise MeshError(
                f"--redirect ebpf: kernel {probe.kernel} lacks {', '.join(ebpf_missing)}"
                " (see `meshagent probe-kernel`); use --redirect iptables or auto"
            )
        hooks = not ebpf_missing and wanted != "iptables"
        # The verdict loads whenever the kernel can splice, so that
        # `datapath set sockmap` works whatever the agent started with.
        verdict = probe.has(*kernel.SOCKMAP_NEEDS)
        if hooks or verdict:
            self.datapath = load(self.cfg, self.cgroup_path, hooks=hooks, verdict=verdict)
            self.stack.callback(self.datapath.close)
        if hooks:
            self.backends["ebpf"] = EbpfBackend(self.datapath, self.cfg.port)
        if probe.features["iptables"].ok:
            self.backends["iptables"] = self._iptables_backend()
        if "ebpf" in self.backends:
            self.default_backend = "ebpf"
            self.backend_reason = (
                "asked for with --redirect ebpf" if wanted == "ebpf" else probe.pick_backend()[1]
            )
        elif "iptables" in self.backends:
            self.default_backend = "iptables"
            self.backend_reason = (
                "asked for with --redirect iptables"
                if wanted == "iptables"
                else f"ebpf lacks {', '.join(ebpf_missing)}"
            )
        else:
            raise MeshError(
                f"no redirect backend: ebpf lacks {', '.join(ebpf_missing) or 'nothing'}"
                f" and {probe.features['iptables'].how}"
            )

    def _iptables_backend(self):
        from meshagent.redirect.iptables import IptablesBackend, Tools
        from meshagent.redirect.rules import RuleConfig

        backend = IptablesBackend(
            RuleConfig(
                self.cfg.port, self.cfg.skip_mark, self.cfg.exclude_ports, self.cfg.exclude_cidrs
            ),
            Tools.of(self.probe.iptables_flavour),
        )
        # A crash leaves rules behind: remove them before anything is attached.
        for pod in self.store.all():
            if netns.exists(pod.netns):
                try:
                    backend.remove(pod.name, pod.netns, quiet=True)
                except MeshError:
                    pass
        return backend

    def _choose_datapath(self) -> None:
        from meshagent.forwarder import selftest

        wanted = self.cfg.datapath
        if wanted == "auto":
            mode, why = selftest.choose(self.forwarder.maps)
            if mode != "sockmap" and self.forwarder.maps is None:
                why = f"{self.probe.pick_datapath()[1]}; {why}"
        elif wanted == "sockmap" and self.forwarder.maps is None:
            problem = self.datapath.sockmap_error if self.datapath else "not loaded"
            lacking = ", ".join(self.probe.missing(kernel.SOCKMAP_NEEDS))
            raise MeshError(
                f"--datapath sockmap: not available ({lacking or problem}); use --datapath auto"
            )
        else:
            mode, why = wanted, f"asked for with --datapath {wanted}"
        self.forwarder.set_mode(mode)
        self.datapath_reason = why
        self.log.info(f"data path {mode}", extra={"reason": why})
        self.loop.call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        """Once a second: delete finished connections' sockmap entries; if a
        verdict redirect failed since the last look, recheck spliced pairs."""
        self._finish_draining()
        if self.forwarder.maps is not None:
            self.forwarder.maps.flush()
            failed = self.datapath.metric("redirect_failed")
            if failed != self._sweep_failures:
                self._sweep_failures = failed
                self.forwarder.sweep()
        self.loop.call_later(1.0, self._sweep)

    def set_datapath(self, mode: str) -> dict:
        self.forwarder.set_mode(mode)
        self.datapath_reason = "set while running (`meshagent datapath set`)"
        self.log.info(f"data path {mode} for new connections", extra={"reason": "datapath set"})
        return {"datapath": mode}

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
            self.log.info("agent stopped; everything it made is removed")

    # -- pods --------------------------------------------------------------
    def attach(self, name: str, redirect: str | None = None) -> dict:
        pod = self.store.get(name)
        if name in self.attached:
            return {"pod": name, "already": True, "backend": self.attached[name].backend}
        backend_name = redirect or self.default_backend
        backend = self.backends.get(backend_name)
        if backend is None:
            why = (
                "unknown backend"
                if backend_name not in ("ebpf", "iptables")
                else "not available on this agent (see `meshagent status`)"
            )
            raise MeshError(f"pod {name}: redirect {backend_name}: {why}")
        if not netns.exists(pod.netns):
            raise MeshError(f"pod {name}: network namespace {pod.netns} does not exist")
        with ExitStack() as undo:
            fd = netns.open_fd(pod.netns)
            undo.callback(os.close, fd)
            handle = PodHandle(name, pod.netns, netns.cookie(fd), self._next_pod_id)
            self.forwarder.open_pod(
                name, handle.pod_id, fd, handle.netns_cookie, backend.lookup(handle), backend.name
            )
            undo.callback(self.forwarder.close_pod, name)
            try:
                backend.attach(handle)
            except MeshError:
                raise
            except Exception as exc:
                raise MeshError(f"pod {name}: attach failed: {exc}") from None
            undo.pop_all()
        self._next_pod_id += 1
        self.attached[name] = Attached(handle, backend.name, fd, time.time())
        self.log.info(
            "pod attached",
            extra={"pod": name, "reason": f"backend={backend.name} netns={pod.netns}"},
        )
        return {"pod": name, "already": False, "backend": backend.name}

    def detach(self, name: str) -> dict:
        entry = self.attached.get(name)
        if entry is None:
            self.store.get(name)  # unknown pod: say so
            raise MeshError(f"pod {name} is not attached")
        backend = self.backends[entry.backend]
        self.forwarder.close_pod(name)  # queued connections are accepted first
        open_conns = self.forwarder.open_connections(name)
        try:
            owed = backend.detach(entry.handle, open_connections=open_conns > 0)
        except MeshError as exc:
            if netns.exists(entry.handle.netns_name):
                raise
            owed = False
            self.log.warning(
                "pod netns gone; nothing to remove", extra={"pod": name, "reason": str(exc)}
            )
        del self.attached[name]
        os.close(entry.netns_fd)
        if owed:
            self.draining[name] = entry
        self.log.info(
            "pod detached",
            extra={"pod": name, "reason": f"{open_conns} open connections finish as they are"},
        )
        return {"pod": name, "open_connections": open_conns}

    def _finish_draining(self, everything: bool = False) -> None:
        """Remove rules kept for connections open at detach, once they closed."""
        for name, entry in list(self.draining.items()):
            if name in self.attached:
                del self.draining[name]  # attached again: the rules are live again
            elif everything or self.forwarder.open_connections(name) == 0:
                del self.draining[name]
                try:
                    self.backends[entry.backend].remove(name, entry.handle.netns_name)
                except MeshError as exc:
                    self.log.warning("rule removal failed", extra={"pod": name,
                                                                   "reason": str(exc)})  # fmt: skip

    def _detach_all(self) -> None:
        for name in list(self.attached):
            try:
                self.detach(name)
            except MeshError as exc:
                self.log.warning("detach failed", extra={"pod": name, "reason": str(exc)})
        if self.forwarder is not None:
            self.forwarder.close()
        self._finish_draining(everything=True)

    # -- reporting ---------------------------------------------------------
    def status(self) -> dict:
        from meshagent.status import agent_status

        return agent_status(self)

    def dispatch(self, request: dict) -> dict:
        op = request.get("op")
        pod = request.get("pod")
        if op == "ping":
            return {"pid": os.getpid()}
        if op in ("attach", "detach"):
            if not isinstance(pod, str):
                raise MeshError(f"{op}: a pod name is required")
            if op == "attach":
                return self.attach(pod, request.get("redirect"))
            return self.detach(pod)
        if op == "status":
            return self.status()
        if op == "connections":
            return {"connections": self.forwarder.connections()}
        if op == "datapath":
            mode = request.get("set")
            if mode is not None:
                return self.set_datapath(str(mode))
            return {"datapath": self.forwarder.mode, "reason": self.datapath_reason}
        raise MeshError(f"unknown request {op!r}")


def _raise_fd_limit() -> None:
    """Each forwarded connection holds two fds: lift the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(cfg: AgentConfig) -> None:
    log.setup(cfg.log_format)
    agent = Agent(cfg)
    agent.start()
    try:
        agent.run()
    finally:
        agent.stop()
