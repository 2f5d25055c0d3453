"""The agent: loads the datapath, serves the control API, runs the forwarder.

Everything started is registered on one ExitStack at once, so SIGTERM, an
error half-way through start, or a normal stop all unwind the same way.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from meshagent import cgroup, log, names, netns
from meshagent.config import AgentConfig
from meshagent.control import ControlServer
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.forwarder.loop import Loop
from meshagent.forwarder.sockmap import SockmapMaps
from meshagent.pods.store import PodStore


@dataclass
class Attached:
    name: str
    pod_id: int
    netns_cookie: int
    netns_fd: int
    since: float


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.log = log.get()
        self.store = PodStore(cfg.state_dir)
        self.loop = Loop()
        self.stack = ExitStack()
        self.attached: dict[str, Attached] = {}
        self._next_pod_id = 1
        self.datapath = None
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
        from meshagent.bpf import compile_and_attach

        self.stack.callback(self.loop.close)
        _raise_fd_limit()
        self.cgroup_path = cgroup.resolve(self.cfg.cgroup)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        control = ControlServer(self.loop, self.cfg.socket_path, self.dispatch)
        self.stack.callback(control.close)
        self.datapath = compile_and_attach(self.cfg, self.cgroup_path)
        self.stack.callback(self.datapath.close)
        self.forwarder = Forwarder(
            self.loop,
            self.datapath.lookup_orig,
            self.cfg.skip_mark,
            self.cfg.port,
            maps=None if self.datapath.sockmap_error else SockmapMaps(self.datapath),
        )
        self._choose_datapath()
        self.stack.callback(self._detach_all)
        self._write_info()
        self.stack.callback(self._info_path().unlink, missing_ok=True)
        self._install_signals()
        self.ready = True
        self.log.info(
            "agent ready",
            extra={"reason": f"cgroup={self.cgroup_path} socket={self.cfg.socket_path}"},
        )

    def _choose_datapath(self) -> None:
        from meshagent.forwarder import selftest

        wanted = self.cfg.datapath
        if wanted == "auto":
            mode, why = selftest.choose(self.forwarder.maps)
        elif wanted == "sockmap" and self.forwarder.maps is None:
            raise MeshError(
                f"--datapath sockmap: not available ({self.datapath.sockmap_error});"
                " use --datapath auto"
            )
        else:
            mode, why = wanted, f"asked for with --datapath {wanted}"
        self.forwarder.set_mode(mode)
        self.datapath_reason = why
        self.log.info(f"data path {mode}", extra={"reason": why})
        self._sweep_failures = 0
        self.loop.call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        """Once a second: if a verdict redirect failed since the last look,
        recheck spliced connections for bytes left in a queue."""
        if self.forwarder.maps is not None:
            self.forwarder.maps.flush()
        failed = self.datapath.metrics().get("redirect_failed", {}).get("egress", 0)
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
    def attach(self, name: str) -> dict:
        pod = self.store.get(name)
        if name in self.attached:
            return {"pod": name, "already": True}
        if not netns.exists(pod.netns):
            raise MeshError(f"pod {name}: network namespace {pod.netns} does not exist")
        fd = netns.open_fd(pod.netns)
        try:
            cookie = netns.cookie(fd)
            pod_id = self._next_pod_id
            self.forwarder.open_pod(name, pod_id, fd, cookie)
        except BaseException:
            os.close(fd)
            raise
        try:
            self.datapath.set_pod(cookie, pod_id, self.cfg.port)
        except Exception as exc:
            self.forwarder.close_pod(name)
            os.close(fd)
            raise MeshError(f"pod {name}: attach failed: {exc}") from None
        self._next_pod_id += 1
        self.attached[name] = Attached(name, pod_id, cookie, fd, time.time())
        self.log.info("pod attached", extra={"pod": name, "reason": f"netns_cookie={cookie}"})
        return {"pod": name, "already": False, "netns_cookie": cookie}

    def detach(self, name: str) -> dict:
        entry = self.attached.pop(name, None)
        if entry is None:
            self.store.get(name)  # unknown pod: say so
            raise MeshError(f"pod {name} is not attached")
        self.datapath.del_pod(entry.netns_cookie)
        self.forwarder.close_pod(name)
        os.close(entry.netns_fd)
        self.log.info("pod detached", extra={"pod": name})
        return {"pod": name}

    def _detach_all(self) -> None:
        for name in list(self.attached):
            try:
                self.detach(name)
            except MeshError as exc:
                self.log.warning("detach failed", extra={"pod": name, "reason": str(exc)})
        if self.forwarder is not None:
            self.forwarder.close()

    # -- reporting ---------------------------------------------------------
    def status(self) -> dict:
        pods = []
        for name, entry in sorted(self.attached.items()):
            slot = self.forwarder.pods[name]
            stats = slot.stats.to_dict()
            live_out, live_in = self.forwarder.live_bytes(name)
            stats["bytes_out"] += live_out
            stats["bytes_in"] += live_in
            pods.append(
                {
                    "name": name,
                    "netns_cookie": entry.netns_cookie,
                    "attached_since": entry.since,
                    "listeners": [f"127.0.0.1:{self.cfg.port}", f"[::1]:{self.cfg.port}"],
                    **stats,
                }
            )
        return {
            "pid": os.getpid(),
            "backend": "ebpf",
            "datapath": self.forwarder.mode,
            "datapath_reason": self.datapath_reason,
            "datapaths": {k: v.to_dict() for k, v in self.forwarder.paths.items()},
            "cgroup": str(self.cgroup_path),
            "port": self.cfg.port,
            "exclude_ports": list(self.cfg.exclude_ports),
            "exclude_cidrs": list(self.cfg.exclude_cidrs),
            "kernel": platform.release(),
            "kernel_features": [
                "cgroup/connect4",
                "cgroup/connect6",
                "sock_ops",
                "bpf_get_netns_cookie",
                "bpf_sk_lookup_tcp (fail-open)",
                "bpf_link",
            ],
            "uptime_seconds": round(time.time() - self.started, 1),
            "pods": pods,
            "decisions": self.datapath.metrics(),
            "live_steered": self.datapath.live_connections(),
            "map_entries": {
                name: self.datapath.map_fd(name).count()
                for name in (
                    names.MAP_ORIG_TUP,
                    names.MAP_SOCKHASH,
                    names.MAP_PEER,
                    names.MAP_PASSED,
                    names.MAP_SENT,
                )
            },
        }

    def dispatch(self, request: dict) -> dict:
        op = request.get("op")
        pod = request.get("pod")
        if op == "ping":
            return {"pid": os.getpid()}
        if op in ("attach", "detach"):
            if not isinstance(pod, str):
                raise MeshError(f"{op}: a pod name is required")
            return self.attach(pod) if op == "attach" else self.detach(pod)
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
