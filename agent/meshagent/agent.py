"""The agent: probes the machine, asks the plan what to use, loads what the
plan names, serves the control API and runs the forwarder.

Everything started is registered on one ExitStack at once, so SIGTERM, an
error half-way through start, or a normal stop all unwind the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import ExitStack
from pathlib import Path

from meshagent import kernel, log, takeover
from meshagent.addrs import metrics_exposure, parse_addr
from meshagent.api import Handler, Reply, Request
from meshagent.attachments import Attachments
from meshagent.bpf import loader, objects
from meshagent.bpf.loader import Loaded
from meshagent.bpf.pins import Pins, instance_name
from meshagent.client import agent_running
from meshagent.config import AgentConfig
from meshagent.control import ControlServer
from meshagent.datapath_control import DataPathControl
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder, build_paths, selftest
from meshagent.forwarder.sockmap_maps import SockmapMaps
from meshagent.host import caps, cgroup
from meshagent.host.loop import Loop
from meshagent.host.worker import Worker
from meshagent.kube.autoattach import KubePods
from meshagent.kube.watch import ApiWatch, settings
from meshagent.metrics import Collector, MetricsServer, healthy_since
from meshagent.modes import Backend, DataPathMode
from meshagent.plan import Plan, plan
from meshagent.pod_ops import pod_handlers
from meshagent.pods.resolve import Resolver
from meshagent.pods.store import PodStore
from meshagent.redirect import Backend as RedirectBackend
from meshagent.redirect import own_cgroup
from meshagent.redirect.ebpf import EbpfBackend
from meshagent.redirect.iptables import IptablesBackend, Tools
from meshagent.redirect.rules import RuleConfig
from meshagent.state import StateDir
from meshagent.status import AgentFacts, Status
from meshagent.trace_feed import TraceFeed

SWEEP_SECONDS = 1.0


class Agent:
    """Start and stop wiring: each part is made with the parts it needs, and
    each control request is a handler in one table (_handlers)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.log = log.get()
        self.state = StateDir(cfg.state_dir)
        self.store = PodStore(cfg.state_dir)
        self.loop = Loop()
        self.stack = ExitStack()
        self.probe: kernel.Probe | None = None
        self.plan: Plan | None = None
        self.loaded: Loaded | None = None
        self.backends: dict[Backend, RedirectBackend] = {}
        self.forwarder: Forwarder | None = None
        self.pods: Attachments | None = None
        self.kube: KubePods | None = None  # which Kubernetes pods to attach
        self.watch: ApiWatch | None = None  # the API watch, when configured
        self.mesh_view = None  # --mesh kube: mesh/kubeview.py, fed by the watch
        self.kernel_conns = None  # kernel mode's records and mesh_kfwd (ebpf backend)
        self.policy = None
        self.enroller = None  # --mesh kube: mesh/enroll.py
        self.control: ControlServer | None = None
        self.facts: AgentFacts | None = None
        self.datapath: DataPathControl | None = None
        self.ready = False
        # `meshagent retire` (the DaemonSet's preStop) said a new pod comes:
        # /readyz says 503 from then on, so that the new pod's probes of the
        # node's shared address wait for its own agent.
        self.retiring = False
        self.heartbeat = time.monotonic()  # the loop's last turn (for /healthz)
        self.published: dict = {}  # the loop's counters, for the metrics thread
        self.metrics: MetricsServer | None = None
        self._collector: Collector | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise MeshError("meshagent run needs root (BPF, network namespaces)")
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
        self.stack.callback(self.loop.close)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        takeover_ = self.cfg.takeover
        if takeover_:  # the running agent holds the lock, the socket and the port
            self.state.check_safe()
            if not agent_running(self.cfg.socket_path):
                raise MeshError(
                    f"--takeover: no agent runs at {self.cfg.socket_path}; start without it"
                )
        else:
            self._lock_state_dir()
            self._serve_metrics()
        _raise_fd_limit()
        self.mesh_parts = self._read_mesh()  # before anything is made: a bad file stops here
        self.policy_rules = self._read_policy()  # likewise
        cgroup_path = cgroup.resolve(self.cfg.cgroup)
        self.probe = kernel.probe(self.cfg.without, self.cfg.iptables)
        self.plan = self._load(cgroup_path)
        if not takeover_:
            self._claim_control()
        self._make_backends()
        self._make_forwarder()
        self._make_pods()
        self._make_policy()
        # Unwound in reverse: the pods stay attached for the next agent (their
        # new connects go direct meanwhile), forwarded connections close, the
        # rules kept for draining pods go.
        self.stack.callback(self.pods.finish_draining, everything=True)
        self.stack.callback(self.forwarder.close)
        self.stack.callback(self.pods.suspend_all)
        self.facts = AgentFacts(
            cgroup_path, self.cfg.port, self.cfg.exclude_ports, self.cfg.exclude_cidrs,
            self.cfg.without, self.metrics.address if self.metrics else None,
        )  # fmt: skip
        if takeover_:
            self.facts.took_over = takeover.receive(
                self.cfg.socket_path, self.pods, self.forwarder, self.state
            )
            took = self.facts.took_over  # the old agent has let go (or exited)
            self.log.info(
                "took over from the running agent",
                extra={"reason": f"pid {took['from_pid']}: {took['pods']} pods,"
                       f" {took['conns']} connections"},
            )  # fmt: skip
            self._lock_state_dir(wait=takeover.EXIT_WAIT)
            self._serve_metrics()
            self.facts.metrics_addr = self.metrics.address if self.metrics else None
            self._claim_control()
        self.facts.adopted = self.pods.adopt()
        self.policy.apply(self.policy_rules)  # every pod's tables, one new generation
        self._kernel_forwarded()
        self.kube.reconcile()  # CNI records of pods to attach that came while no agent ran
        if self.watch is not None:
            self.watch.start()
            self.stack.callback(self.watch.close)
            if self.mesh_view is not None:
                self._enroll()
        self.pods.start_offloading()
        reader = Worker(self.loop, "reader")  # whole-map walks for status
        self.stack.callback(reader.close)
        self.stack.callback(self.pods.stop_offloading)  # first: queued rule work ends
        self.control.serve(self._handlers(reader))
        self._publish()
        self.loop.call_later(SWEEP_SECONDS, self._sweep)
        self._install_signals()
        self.ready = True
        self.log.info(
            "agent ready",
            extra={
                "reason": f"backend={self.plan.backend} datapath={self.forwarder.mode}"
                f" cgroup={cgroup_path} socket={self.cfg.socket_path}"
            },
        )

    def _handlers(self, reader: Worker) -> dict[str, Handler]:
        """Every control request, op -> handler, each made with what it needs."""
        trace = TraceFeed(self.loaded, self.forwarder, self.pods)
        status = Status(
            self.facts, self.loop, self.plan, self.probe, self.loaded, self.backends,
            self.forwarder, self.pods, self.datapath, trace, self.kube, self.watch, reader,
        )  # fmt: skip
        forwarder = self.forwarder
        self.handover = takeover.Handover(
            self.loop, self.forwarder, self.pods, self.state.successor_lock
        )

        def ping(_request: Request) -> Reply:
            return Reply({"pid": os.getpid()})

        def connections(_request: Request) -> Reply:
            if forwarder.kernel is not None:
                forwarder.kernel.drain()  # kernel-mode records that wait in the ring
            return Reply({"connections": forwarder.connections()})

        def retiring(_request: Request) -> Reply:
            if not self.retiring:
                self.retiring = True
                self.log.info("retiring", extra={"reason": "a new agent pod will take over;"
                                                 " /readyz says 503 from now on"})  # fmt: skip
            return Reply({"pid": os.getpid()})

        return {
            "ping": ping,
            **pod_handlers(self.pods, self.kube),
            "status": status,
            "trace": trace,
            "connections": connections,
            "handover": self.handover,
            "retiring": retiring,
            "datapath": self.datapath,
            "policy": self._policy_request,
        }

    def _read_policy(self):
        from meshagent.policy.model import PolicySet, load

        if self.cfg.policy is None:
            return PolicySet(source="none")
        return load(self.cfg.policy)

    def _make_policy(self) -> None:
        """The policy engine, and the pods' part in it: a pod's tables
        before its connects are steered; new tables when pods come and go."""
        from meshagent.policy.engine import PolicyEngine

        engine = PolicyEngine(self.loaded, self.loop.call_later)
        engine.path = self.cfg.policy
        engine.pods = lambda: [
            (self._workload(e.handle.name),
             e.handle.netns_cookie if e.backend.name is Backend.EBPF else None)
            for e in self.pods.attached() if not e.draining
        ]  # fmt: skip
        engine.peers = self._policy_peers

        def prepare(handle, backend) -> None:
            if backend.name is Backend.EBPF:
                engine.prepare(self._workload(handle.name), handle.netns_cookie)

        self.pods.prepare = prepare

        def changed() -> None:
            engine.pods_changed()
            self._kernel_forwarded()

        self.pods.changed = changed
        self.policy = engine
        if self.watch is not None:  # AuthorizationPolicy objects (deploy/policy-crd.yaml)
            waiting: list = []

            def pods_changed() -> None:  # a burst of pod events: one new generation
                def run() -> None:
                    waiting.clear()
                    engine.pods_changed()

                if engine.holding:  # the first listing: the rules go in force now
                    engine.release()
                elif not waiting:
                    waiting.append(self.loop.call_later(0.5, run))

            engine.holding = True

            self.watch.on_policies = engine.apply_kube
            self.watch.on_pods = pods_changed
        self.forwarder.policy = engine
        self.forwarder.workload_of = self._workload

    def _workload(self, name: str):
        """What the policy knows of an attached pod of this node."""
        from meshagent.policy.model import Workload

        if "/" in name:  # NAMESPACE/NAME: Kubernetes
            namespace, short = name.split("/", 1)
            view = self.kube.pods.get(name)
            if view is None:
                return Workload(short, namespace)
            return Workload(short, namespace, view.service_account or "default",
                            tuple(sorted(view.labels.items())), tuple(view.ips))  # fmt: skip
        pod = self.store.find(name)
        addrs = tuple(a for a in ((pod.ip4, pod.ip6) if pod is not None else ()) if a)
        identity = self.mesh_parts[0].workload(name) if self.mesh_parts else ""
        labels = tuple(sorted(pod.labels.items())) if pod is not None else ()
        return Workload(name, labels=labels, addrs=addrs, identity=identity)

    def _policy_peers(self) -> list:
        """Workloads the policy can name besides the attached pods: this
        node's other standalone pods, and other nodes' pods (Kubernetes'
        mesh view)."""
        from meshagent.policy.model import Workload

        attached = {e.handle.name for e in self.pods.attached() if not e.draining}
        out = [self._workload(p.name) for p in self.store.scan()[0] if p.name not in attached]
        out += [self._workload(name) for name, pod in self.kube.pods.items()
                if name not in attached and _addressed(pod)]  # fmt: skip
        view = self.mesh_view
        if view is None:
            return out
        for name, pod in getattr(view, "pods", {}).items():
            if "/" not in name or name in self.kube.pods or not _addressed(pod):
                continue
            namespace, short = name.split("/", 1)
            out.append(Workload(short, namespace, pod.service_account or "default",
                                tuple(sorted(pod.labels.items())), tuple(pod.ips)))  # fmt: skip
        return out

    def _policy_request(self, request: Request) -> Reply:
        """show | apply (text, source) | check (pod, dest, port, from)."""
        action = request.text("action")
        engine = self.policy
        if action == "show":
            return Reply({**engine.summary(), "rule_ids": [r.id for r in engine.rules.rules]})
        if action == "apply":
            return Reply(engine.apply_file(Path(request.text("path"))))
        if action == "check":
            return Reply(self._policy_check(request))
        raise MeshError(f"policy: no action {action!r} (show, apply, check)")

    def _policy_check(self, request: Request) -> dict:
        import ipaddress

        from meshagent.policy.model import workload_of_identity

        name = request.text("pod")
        attached = any(e.handle.name == name for e in self.pods.attached() if not e.draining)
        if not attached and "/" not in name and self.store.find(name) is None:
            raise MeshError(f"pod {name}: no such pod (see `meshagent pod list`)")
        pod = self._workload(name)
        ip, port = request.text("ip"), request.optional_int("port") or 0
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise MeshError(f"policy check: {ip!r} is not an IP address") from None
        src = request.optional_text("from")
        if src is None:
            decision = self.policy.decide_egress(pod, ip, port)
            direction = "egress"
        else:  # ingress to pod's port, from a workload named by ID (or at ip)
            peer = workload_of_identity(src, ip) if src else self.policy.peer_at(ip)
            decision = self.policy.decide_ingress(pod, ip, port, peer)
            direction = "ingress"
        return {"pod": name, "direction": direction, "peer": ip, "port": port, "from": src,
                **decision.to_dict(), "policy_version": self.policy.version}  # fmt: skip

    def _make_forwarder(self) -> None:
        maps = SockmapMaps(self.loaded, self.cfg.sockmap_budget) if self.plan.sockmap else None
        modes = tuple(
            m for m in DataPathMode if m is not DataPathMode.SPLICE or self.probe.has("splice")
        )

        def paths(loop: Loop, wake: bool = True):
            msg = self.plan.msg and self.cfg.sockmap_msg
            return build_paths(loop, modes, maps, self.cfg.sockmap_sndbuf, msg, wake,
                               self.cfg.sockmap_replies)  # fmt: skip

        mode, reason = self._choose_datapath(lambda loop: paths(loop, wake=False))
        self.forwarder = Forwarder(
            self.loop, self.cfg.port, paths(self.loop), mode, self.cfg.pod_conns_max,
            memory_max=self.cfg.memory_max,
        )  # fmt: skip
        self.datapath = DataPathControl(self.forwarder, self.plan.msg, reason)
        if Backend.EBPF in self.backends:  # kernel mode: the hooks decide and account
            from meshagent.forwarder.kernel_conns import KernelConns

            self.kernel_conns = KernelConns(self.loop, self.loaded, self.forwarder)
        if self.mesh_parts is not None:
            from meshagent.mesh.node import Mesh

            mesh = Mesh(self.loop, *self.mesh_parts)
            store = self.store

            def mode_of(name: str) -> str:
                """A standalone pod's, from its record (pod create --mtls)."""
                pod = store.find(name) if "/" not in name else None
                return pod.mtls if pod is not None else "permissive"

            mesh.mode_of = mode_of
            if self.mesh_view is not None:  # Kubernetes: the labels say
                mesh.mode_of = self.mesh_view.mode
                mesh.enforce_modes = True
            self.forwarder.use_mesh(mesh)

    def _read_mesh(self):
        """(the mesh view, this node's certificates, the kernel TLS reason),
        or None without --mesh. With --mesh kube: the view is the API's;
        the certificate one the identity service gave this node before (a
        restart, a takeover: the mesh goes on at once), else None until the
        node is enrolled."""
        if self.cfg.mesh is None:
            return None
        import socket as _socket

        from meshagent.mesh.certs import NodeCerts

        me = self.cfg.node_name or _socket.gethostname()
        if str(self.cfg.mesh) == "kube":
            from meshagent.mesh.kubeview import KubeMeshView

            self.mesh_view = KubeMeshView("", me)
            self.mesh_view.state_dir = self.cfg.state_dir
            domain = _cached_trust_domain(self.cfg.certs, me)
            if domain is None:
                return None
            self.mesh_view.trust_domain = domain
            view = self.mesh_view
        else:
            from meshagent.mesh import meshfile

            view = meshfile.load(self.cfg.mesh, me)
            NodeCerts(self.cfg.certs, view.trust_domain, me)  # a bad certificate stops here
        kernel, why = self._kernel_tls()
        return view, NodeCerts(self.cfg.certs, view.trust_domain, me, kernel), why

    def _kernel_tls(self) -> tuple[bool, str]:
        if self.cfg.ktls == "off":
            return False, "--ktls off"
        from meshagent.mesh import ktls

        return ktls.selftest(self.cfg.certs)

    def _make_pods(self) -> None:
        """The attachments, the pod resolver and the Kubernetes side (CNI
        records always; the API watch when configured)."""
        resolver = Resolver(self.store)
        self.pods = Attachments(
            self.store, self.state, self.forwarder, self.backends, self.plan.backend, resolver
        )
        self.kube = KubePods(self.pods, resolver.cni)
        resolver.uid_of = self.kube.uid_of
        kube_cfg = settings(self.cfg.kubeconfig, self.cfg.node_name, self.cfg.kube)
        if kube_cfg is not None:
            self.watch = ApiWatch(self.loop, self.kube, kube_cfg, self.mesh_view)
            self.kube.watching = True

    def _enroll(self) -> None:
        """--mesh kube: the node's certificate from the identity service; the
        mesh starts with the first one (until then, connections to other
        nodes go as without a mesh)."""
        from meshagent.kube.watch import make_client
        from meshagent.mesh.enroll import TOKEN, Enroller

        namespace = os.environ.get("POD_NAMESPACE", "meshagent")
        token = Path(os.environ.get("MESHAGENT_CA_TOKEN", str(TOKEN)))
        mesh = self.forwarder.mesh  # started with a certificate left on this node
        cached = mesh.certs.not_after_epoch() if mesh is not None else None
        enroller = Enroller(make_client(self.watch.cfg), namespace, self.cfg.certs, token,
                            lambda got: self.loop.post(lambda: self._enrolled(got)), cached)  # fmt: skip
        if mesh is not None:
            mesh.enroll = enroller
        self.enroller = enroller
        enroller.start()
        self.stack.callback(enroller.close)

    def _enrolled(self, got) -> None:
        from meshagent.mesh.certs import NodeCerts
        from meshagent.mesh.node import Mesh

        if self.forwarder.mesh is not None:
            self.forwarder.mesh.enroll = self.enroller
            return  # the files changed: NodeCerts takes them up
        view = self.mesh_view
        view.trust_domain = got.trust_domain
        kernel, why = self._kernel_tls()
        try:
            certs = NodeCerts(self.cfg.certs, view.trust_domain, view.me, kernel)
        except MeshError as exc:
            self.log.warning("the identity service's certificate does not fit this node",
                             extra={"reason": str(exc)})  # fmt: skip
            return
        mesh = Mesh(self.loop, view, certs, why)
        mesh.mode_of = view.mode
        mesh.enforce_modes = True
        mesh.enroll = self.enroller
        self.forwarder.use_mesh(mesh)
        self.log.info("joined the mesh", extra={"identity": got.identity,
                                                "trust_domain": got.trust_domain})  # fmt: skip

    def _claim_control(self) -> None:
        """The control socket, claimed now (a second agent is refused); it
        answers once the loop runs, with the handlers start() registers."""
        self.control = ControlServer(self.loop, self.cfg.socket_path, {})
        self.stack.callback(self.control.close)

    def _serve_metrics(self) -> None:
        """Up before anything is loaded, so /readyz says 503 until it is."""
        addr = parse_addr(self.cfg.metrics_addr)
        if addr is None:
            return
        collector = Collector(lambda: self.published, None)
        self.metrics = MetricsServer(
            addr, collector, healthy_since(lambda: self.heartbeat),
            lambda: self.ready and not self.retiring,
        )  # fmt: skip
        self.stack.callback(self.metrics.close)
        self._collector = collector
        exposed = metrics_exposure(self.cfg.metrics_addr)
        if exposed:
            self.log.warning(exposed, extra={"reason": "--metrics-addr"})

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
        """One agent per state dir: the lock is held for the agent's life."""
        self.state.check_safe()
        fd = self.state.lock(wait)
        self.stack.callback(os.close, fd)

    def _load(self, cgroup_path: Path) -> Plan:
        """Plan, then load what the plan names. A program the kernel refuses
        (or a compile that fails) becomes a fact of the probe and the plan
        is asked again: auto falls through, an explicit choice says why."""
        objects.check_cache_dir(self.cfg.cache_dir)  # unsafe: refuse, never fall back
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
            self.loaded = loader.attach(fds, maps, cgroup_path, pins)
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
        cfg = self.cfg
        if Backend.EBPF in self.plan.backends:
            self.backends[Backend.EBPF] = EbpfBackend(
                self.loaded, cfg.port, cfg.exclude_ports, cfg.exclude_cidrs, cfg.conns_max
            )
        if Backend.IPTABLES in self.plan.backends:
            # Rules an earlier agent left: adopt() takes over the pods of
            # attached.json and removes the rest (a pod being attached or
            # detached when it crashed is there too).
            # The forwarder's own sockets are known by the agent's cgroup,
            # which it may first have to move into (own_cgroup.py).
            rel = cgroup.resolve(cfg.cgroup).relative_to(cgroup.cgroup2_mount())
            attach = "/" if rel == Path(".") else "/" + rel.as_posix()
            try:
                own = own_cgroup.settle(attach, instance_name(cfg.state_dir))
            except MeshError as exc:
                if self.plan.backend is Backend.IPTABLES:
                    raise
                self.log.warning("iptables backend unavailable", extra={"reason": str(exc)})
                return
            self.stack.callback(own.release)
            rules = RuleConfig(cfg.port, own.path, cfg.exclude_ports, cfg.exclude_cidrs)
            self.backends[Backend.IPTABLES] = IptablesBackend(
                rules, Tools.of(self.probe.iptables_flavour), own
            )

    def _choose_datapath(self, paths) -> tuple[DataPathMode, str]:
        candidates = self.plan.datapaths
        if len(candidates) > 1:
            mode, why = selftest.choose(candidates, paths)
            reason = f"{self.plan.datapath_reason}; {why}"
        else:
            mode, reason = candidates[0], self.plan.datapath_reason
        self.log.info(f"data path {mode}", extra={"reason": reason})
        return mode, reason

    def _sweep(self) -> None:
        """Once a second: rules of drained pods go, vanished pods are
        forgotten, each data path's upkeep."""
        self.pods.finish_draining()
        self.pods.drop_vanished()
        self.kube.retry_pending()
        self.forwarder.tick()
        self._kernel_forwarded()
        self._publish()
        self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def _kernel_forwarded(self) -> None:
        """mesh_kfwd: where kernel-mode pods' connects still go to the
        forwarder: other nodes' pods (mutual TLS) and this node's pods
        with ingress rules (the forwarder checks them)."""
        if self.kernel_conns is None:
            return
        from meshagent.forwarder.kernel_conns import forwarded_networks

        mesh = self.forwarder.mesh
        policy = self.policy
        ingress = policy.ingress_addrs() if policy is not None and policy.has_ingress else []
        nets = forwarded_networks(mesh.view if mesh is not None else None, ingress)
        try:
            self.kernel_conns.forward_to(nets)
        except OSError as exc:
            self.log.error("kernel mode: mesh_kfwd not written", extra={"reason": str(exc)})

    def _install_signals(self) -> None:
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        old_fd = signal.set_wakeup_fd(wfd.fileno())
        handlers = {
            sig: signal.signal(sig, lambda *_: None)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
            elif signal.SIGHUP in data:
                self.log.info("SIGHUP: the policy file again")
                try:
                    self.policy.reload()
                except MeshError as exc:
                    self.log.warning("policy not applied", extra={"reason": str(exc)})

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
    import signal
    import sys

    faulthandler.enable()  # a crash in native code (BCC, ssl) leaves every thread's stack
    log.setup(cfg.log_format)
    # The loop shares the GIL with the metrics thread; when the loop wakes
    # while a scrape holds the GIL it waits up to this long (Python's
    # default is 5 ms; bench/scrape.py measures the difference).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    # A SIGHUP (policy reload) that comes while the agent starts, before
    # its handlers are in, must not stop it: the policy is read at start.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
    handover = getattr(agent, "handover", None)
    if handover is not None and handover.done and cfg.after_handover == "wait":
        _wait_for_stop(agent.log)


def _wait_for_stop(logger) -> None:
    """Handed over, in a container: stay until stopped, holding nothing (a
    container that exits is restarted by the kubelet)."""
    import signal
    import threading

    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    logger.info(
        "handed over; waiting to be stopped",
        extra={"reason": "--after-handover wait: the successor has every pod and connection"},
    )
    while not stopped.wait(3600):
        pass


def _cached_trust_domain(certs: Path, node: str) -> str | None:
    """The trust domain of a node certificate left in certs by an earlier
    agent of this node (the identity service's), if it is still good."""
    import datetime as dt

    from meshagent.mesh import ca
    from meshagent.mesh.identity import SpiffeId

    try:
        info = ca.describe(certs / ca.NODE_CERT)
        ident = SpiffeId.parse(info["identity"] or "")
    except (OSError, ValueError, MeshError):
        return None
    ends = dt.datetime.fromisoformat(info["not_after"])
    if not ident.is_node or ident.node != node or ends < dt.datetime.now(dt.UTC):
        return None
    return ident.trust_domain


def _addressed(pod) -> bool:
    """A Kubernetes pod whose addresses stand for it: running in its own
    network (not hostNetwork: the node's address), not finished (its
    address may be another pod's by now)."""
    return bool(pod.ips) and not pod.host_network and pod.phase not in ("Succeeded", "Failed")
