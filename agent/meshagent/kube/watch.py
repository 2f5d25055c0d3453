"""The API watch: pods on this node (fieldSelector spec.nodeName) and the
namespaces' labels, fed to kube/autoattach.py on the agent's loop. With the
mesh on (`--mesh kube`) it watches every node's pods instead: this node's
go to kube/autoattach.py, all of them to the mesh's view (mesh/kubeview.py).
The authorization policies (deploy/policy-crd.yaml) are watched apart:
every change hands the whole set to the policy (on_policies).

Each kind is listed, then watched from the list's resourceVersion. A watch
that breaks (the server ends it, or the connection drops) resumes from the
last resourceVersion it saw; one the server no longer has (410 Gone) is
listed again, and the full list reconciles. An API server that is down or
refuses (401/403) is retried with backoff, logged once per distinct
reason; the node's pods keep working meanwhile.

Client: lightkube (about 15 MB with its models, against about 160 MB for
the official client): an agent on every node pays its client on every node.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from meshagent import log
from meshagent.errors import MeshError
from meshagent.kube.autoattach import KubePods, PodView

BACKOFF_MAX = 30.0
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KubeSettings:
    node: str
    kubeconfig: str | None  # None: in-cluster (the pod's service account)


def settings(kubeconfig: str | None, node: str | None, mode: str) -> KubeSettings | None:
    """The API watch's settings, or None when the agent runs without one.
    mode: off | auto (a kubeconfig given, or running in a cluster) | on."""
    if mode == "off":
        return None
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SERVICE_ACCOUNT.is_dir()
    if not kubeconfig and not in_cluster:
        if mode == "on":
            raise MeshError(
                "--kube on: no --kubeconfig and not in a cluster (no KUBERNETES_SERVICE_HOST"
                f" and {SERVICE_ACCOUNT})"
            )
        return None
    if kubeconfig and not Path(kubeconfig).is_file():
        raise MeshError(f"--kubeconfig {kubeconfig}: no such file")
    if not node:
        raise MeshError(
            "the API watch needs this node's name: --node-name or NODE_NAME (the downward"
            " API's spec.nodeName)"
        )
    return KubeSettings(node=node, kubeconfig=kubeconfig)


def make_client(cfg: KubeSettings):
    from lightkube import Client, KubeConfig

    try:
        if cfg.kubeconfig:
            config = KubeConfig.from_file(cfg.kubeconfig)
        else:
            config = KubeConfig.from_service_account()
    except Exception as exc:
        raise MeshError(f"kubeconfig {cfg.kubeconfig or 'in-cluster'}: {exc}") from None
    # lightkube's 10 s timeouts apply to lists; a watch's read waits for events.
    return Client(config=config, field_manager="meshagent")


def describe(exc: BaseException) -> str:
    """One line for an API failure: the status code and what it means here."""
    status = getattr(exc, "status", None)
    code = getattr(status, "code", None)
    if code in (401, 403):
        return (
            f"the API server refused ({code} {getattr(status, 'reason', '')}):"
            " the agent's ServiceAccount needs get/list/watch on pods and namespaces"
        )
    if code is not None:
        return f"the API server answered {code}: {getattr(status, 'message', '')}"
    return f"the API server is unreachable: {type(exc).__name__}: {exc}"


class ApiWatch:
    """Two threads (pods, namespaces); results are posted to the loop."""

    def __init__(self, loop, kube: KubePods, cfg: KubeSettings, mesh_view=None) -> None:
        self.loop = loop
        self.kube = kube
        self.cfg = cfg
        self.mesh_view = mesh_view  # mesh/kubeview.py: every node's pods, or None
        self.log = log.get()
        self.stopping = threading.Event()
        self.state: dict[str, str] = {"pods": "starting", "namespaces": "starting"}
        self.listed: dict[str, dict] = {}
        self.relists = 0
        self.resumes = 0
        self.client = make_client(cfg)
        _warm_decoders()
        self.on_policies = None  # (list of AuthorizationPolicy dicts) -> None, on the loop
        self.on_pods = None  # () -> None: a pod came, went or changed (the policy's peers)
        self.policies: dict[str, dict] = {}

    def start(self) -> None:
        kinds = ["pods", "namespaces"]
        if self.on_policies is not None:
            self.state["policies"] = "starting"
            kinds.append("policies")
        for kind in kinds:
            thread = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}",
                                      daemon=True)  # fmt: skip
            thread.start()

    def close(self) -> None:
        self.stopping.set()

    def snapshot(self) -> dict:
        return {"node": self.cfg.node, "state": dict(self.state), "relists": self.relists,
                "resumes": self.resumes}  # fmt: skip

    # -- the threads -------------------------------------------------------
    def _run(self, kind: str) -> None:
        backoff = 1.0
        said = ""
        while not self.stopping.is_set():
            try:
                version = self._list(kind)
                backoff = 1.0
                self._set_state(kind, "watching")
                said = ""
                self._watch(kind, version)
            except Exception as exc:  # keep watching whatever happens
                if self.stopping.is_set():
                    return
                if _gone(exc):
                    self._set_state(kind, "relisting: resourceVersion too old (410)")
                    continue
                why = describe(exc)
                if kind == "policies" and _code(exc) == 404:
                    why = "no AuthorizationPolicy resource: kubectl apply -f deploy/policy-crd.yaml"
                self._set_state(kind, f"retrying: {why}")
                if why != said:
                    self.log.warning(f"API watch of {kind} failed", extra={"reason": why})
                    said = why
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _set_state(self, kind: str, state: str) -> None:
        self.state[kind] = state

    def _list(self, kind: str) -> str:
        from lightkube.resources.core_v1 import Namespace, Pod

        if kind == "policies":
            listing = self.client.list(policy_resource(), namespace="*")
            objs = {_key(o): o.to_dict() for o in listing}
            self.loop.post(lambda: self._policies_listed(objs))
            return listing.resourceVersion
        if kind == "pods":
            listing = self.client.list(Pod, namespace="*", fields=self._fields())
            views = {_pod_name(p): _pod_view(p) for p in listing}
        else:
            listing = self.client.list(Namespace)
            views = {n.metadata.name: dict(n.metadata.labels or {}) for n in listing}
        version = listing.resourceVersion
        self.relists += 1
        self.loop.post(lambda: self._listed(kind, views))
        return version

    def _fields(self) -> dict | None:
        """This node's pods only, unless the mesh wants every node's."""
        return None if self.mesh_view is not None else {"spec.nodeName": self.cfg.node}

    def _local(self, pods: dict[str, PodView]) -> dict[str, PodView]:
        if self.mesh_view is None:
            return pods
        return {name: view for name, view in pods.items() if view.node == self.cfg.node}

    def _listed(self, kind: str, views: dict) -> None:
        self.listed[kind] = views
        if len(self.listed) == 2:
            self.kube.replace_all(self._local(self.listed["pods"]), self.listed["namespaces"])
            if self.mesh_view is not None:
                self.mesh_view.replace_all(self.listed["pods"], self.listed["namespaces"])
            if self.on_pods is not None:  # labels and addresses the policy goes by
                self.on_pods()

    def _watch(self, kind: str, version: str) -> None:
        from lightkube.resources.core_v1 import Namespace, Pod
        from lightkube.types import OnErrorAction, OnErrorResult

        def on_error(exc: Exception, count: int) -> OnErrorResult:
            if self.stopping.is_set() or _gone(exc):
                return OnErrorResult(OnErrorAction.RAISE)
            self.resumes += 1
            self._set_state(kind, f"resuming: {describe(exc)}")
            return OnErrorResult(OnErrorAction.RETRY, sleep=min(2.0**count, BACKOFF_MAX))

        if kind == "policies":
            stream = self.client.watch(policy_resource(), namespace="*", resource_version=version,
                                       on_error=on_error)  # fmt: skip
            for event, obj in stream:
                if self.stopping.is_set():
                    return
                self._set_state(kind, "watching")
                key, body = _key(obj), obj.to_dict()
                self.loop.post(lambda e=event, k=key, b=body: self._policy_event(e, k, b))
            return
        if kind == "pods":
            stream = self.client.watch(Pod, namespace="*", fields=self._fields(),
                                       resource_version=version, on_error=on_error)  # fmt: skip
        else:
            stream = self.client.watch(Namespace, resource_version=version, on_error=on_error)
        for event, obj in stream:
            if self.stopping.is_set():
                return
            self._set_state(kind, "watching")
            if kind == "pods":
                name, view = _pod_name(obj), _pod_view(obj)
                self.loop.post(lambda e=event, n=name, v=view: self._event(kind, e, n, v))
            else:
                name, labels = obj.metadata.name, dict(obj.metadata.labels or {})
                self.loop.post(lambda e=event, n=name, v=labels: self._event(kind, e, n, v))

    def _event(self, kind: str, event: str, name: str, view) -> None:
        """One watch event, on the loop: kept in the listing, then acted on
        once both kinds have been listed."""
        listed = self.listed.get(kind)
        if listed is not None:
            if event == "DELETED":
                listed.pop(name, None)
            else:
                listed[name] = view
        if len(self.listed) == 2:
            if self.mesh_view is not None:
                mesh = (
                    self.mesh_view.pod_event if kind == "pods" else self.mesh_view.namespace_event
                )
                mesh(event, name, view)
                if kind == "pods" and view.node != self.cfg.node:
                    if self.on_pods is not None:
                        self.on_pods()
                    return  # another node's pod: the mesh's only and the policy's
            act = self.kube.pod_event if kind == "pods" else self.kube.namespace_event
            act(event, name, view)
            if kind == "pods" and self.on_pods is not None:
                self.on_pods()

    def _policies_listed(self, objs: dict[str, dict]) -> None:
        self.policies = objs
        self.on_policies(list(objs.values()))

    def _policy_event(self, event: str, key: str, body: dict) -> None:
        if event == "DELETED":
            self.policies.pop(key, None)
        else:
            self.policies[key] = body
        self.on_policies(list(self.policies.values()))


def _warm_decoders() -> None:
    """lightkube decodes with msgspec, which builds a type's decoder on its
    first use; two threads building them at once crashed the agent
    (SIGSEGV in msgspec, twice in 25 starts here). Build them all now, in
    one thread, before the watch threads start."""
    from lightkube.core import decoders
    from lightkube.resources.core_v1 import Namespace, Pod

    empty = b'{"metadata": {"resourceVersion": "1"}, "items": []}'
    for res in (Pod, Namespace):
        decoders.decode_list(empty, res)
        decoders.decode_object(b'{"metadata": {"name": "x"}}', res)
    decoders.decode_watch_event(b'{"type": "ADDED", "object": {}}')
    decoders.decode_status(b'{"code": 410}')


_POLICY = None


def policy_resource():
    """lightkube's class for deploy/policy-crd.yaml's resource (made once)."""
    global _POLICY
    if _POLICY is None:
        from lightkube.generic_resource import create_namespaced_resource

        _POLICY = create_namespaced_resource("meshagent.io", "v1alpha1", "AuthorizationPolicy",
                                             "authorizationpolicies")  # fmt: skip
    return _POLICY


def _key(obj) -> str:
    return f"{obj.metadata.namespace}/{obj.metadata.name}"


def _pod_name(pod) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}"


def _pod_view(pod) -> PodView:
    status, spec = pod.status, pod.spec
    phase = (status.phase if status is not None else None) or ""
    ips: tuple[str, ...] = ()
    if status is not None:
        ips = tuple(p.ip for p in (status.podIPs or []) if p.ip) or (
            (status.podIP,) if status.podIP else ()
        )
    return PodView(
        uid=pod.metadata.uid or "",
        labels=dict(pod.metadata.labels or {}),
        phase=phase,
        node=(spec.nodeName if spec is not None else None) or "",
        ips=ips,
        service_account=(spec.serviceAccountName if spec is not None else None) or "",
        host_network=bool(spec is not None and spec.hostNetwork),
    )


def _code(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "status", None), "code", None)


def _gone(exc: BaseException) -> bool:
    return _code(exc) == 410
