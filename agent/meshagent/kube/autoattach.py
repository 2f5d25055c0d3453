"""Which Kubernetes pods on this node the agent attaches, and when.

A pod is opted in by the label meshagent.io/attach=true on itself or on its
namespace; meshagent.io/attach=false on the pod opts it out of a labelled
namespace. A CNI config with "attach": "all" opts in every pod outside its
excluded namespaces (pods/kubelet.py records that per pod). The API watch
(kube/watch.py) feeds the labels; the CNI plugin tells the agent when a
pod's sandbox is up or going (cni-add, cni-del).

Pods attached because of a label or the CNI config are "auto": only those
are detached when their opt-in goes. `meshagent attach` by hand stays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshagent import log
from meshagent.errors import MeshError
from meshagent.modes import PodMode
from meshagent.pods.kubelet import CniStore

LABEL = "meshagent.io/attach"
MODE_LABEL = "meshagent.io/mode"  # kernel or forward, on the pod or its namespace
RETRY_SECONDS = 5.0  # a wanted pod whose sandbox is not found yet: the first wait
RETRY_MAX_SECONDS = 300.0  # ... doubled at each failure up to this
FINISHED = ("Succeeded", "Failed")  # phases whose containers will not run again


@dataclass
class PodView:
    """What the API server says of a pod (on this node, or, for the mesh,
    on any node)."""

    uid: str
    labels: dict[str, str] = field(default_factory=dict)
    phase: str = ""  # Pending, Running, Succeeded, Failed, Unknown ("" not known)
    node: str = ""  # spec.nodeName
    ips: tuple[str, ...] = ()  # status.podIPs
    service_account: str = ""
    host_network: bool = False


def opted_in(pod_labels: dict[str, str], ns_labels: dict[str, str]) -> bool:
    own = pod_labels.get(LABEL)
    if own is not None:
        return own == "true"
    return ns_labels.get(LABEL) == "true"


def mode_of(pod_labels: dict[str, str], ns_labels: dict[str, str]) -> PodMode | None:
    """The mode the labels ask for (the pod's over its namespace's), or None."""
    for labels in (pod_labels, ns_labels):
        value = labels.get(MODE_LABEL)
        if value in (m.value for m in PodMode):
            return PodMode(value)
    return None


class KubePods:
    def __init__(self, attachments, store: CniStore) -> None:
        self.attachments = attachments
        self.cni = store
        self.log = log.get()
        self.watching = False  # an API watch feeds pods/namespaces
        self.synced = False  # ... and has listed them at least once
        self.pods: dict[str, PodView] = {}  # NAMESPACE/NAME on this node
        self.namespaces: dict[str, dict[str, str]] = {}
        self.pending: dict[str, float] = {}  # wanted, not found yet -> next try
        self.backoff: dict[str, float] = {}  # ... and the wait after the next failure
        self.errors: dict[str, str] = {}  # the last reason a wanted pod is not attached

    # -- what the API says --------------------------------------------------
    def uid_of(self, name: str) -> str | None:
        view = self.pods.get(name)
        return view.uid if view is not None else None

    def wanted(self, name: str) -> tuple[bool, str]:
        view = self.pods.get(name)
        if view is not None and view.phase in FINISHED:
            return False, f"finished ({view.phase})"
        try:
            record = self.cni.get(name)
        except MeshError:
            record = None
        if record is not None and record.attach:
            return True, "the CNI config attaches every pod"
        if view is None:
            return False, "not known to the API watch" if self.watching else "no API watch"
        namespace = name.split("/", 1)[0]
        if opted_in(view.labels, self.namespaces.get(namespace, {})):
            return True, f"labelled {LABEL}=true (pod or namespace)"
        return False, f"not labelled {LABEL}=true"

    def replace_all(self, pods: dict[str, PodView], namespaces: dict[str, dict[str, str]]) -> None:
        """A full list from the API server: reconcile everything."""
        self.pods, self.namespaces = pods, namespaces
        self.synced = True
        self.reconcile()

    def pod_event(self, kind: str, name: str, view: PodView) -> None:
        if kind == "DELETED":
            self.pods.pop(name, None)
        else:
            self.pods[name] = view
        self.reconcile([name])

    def namespace_event(self, kind: str, namespace: str, labels: dict[str, str]) -> None:
        if kind == "DELETED":
            self.namespaces.pop(namespace, None)
        else:
            self.namespaces[namespace] = labels
        self.reconcile([n for n in self.pods if n.startswith(namespace + "/")])

    # -- what the CNI plugin says -----------------------------------------
    def cni_add(self, name: str):
        want, why = self.wanted(name)
        if not want:
            answer = {"pod": name, "attached": False, "reason": why}
            if self.watching and (not self.synced or name not in self.pods):
                # The API view is not complete, or not yet of this pod: the
                # labels may still want it (a plugin told to wait retries).
                answer["undecided"] = True
            return answer
        return self._attach(name, why)

    def cni_del(self, name: str):
        self._forget(name)
        entry = self.attachments.pods.get(name)
        if entry is None or entry.draining:
            return {"pod": name, "detached": False}
        return self.attachments.detach(name)

    # -- the reconciler ----------------------------------------------------
    def reconcile(self, names: list[str] | None = None) -> None:
        """Attach what is wanted and not attached; detach auto-attached pods
        that are no longer wanted (only once the API view is complete)."""
        if names is None:
            names = sorted(set(self.pods) | {r.full_name for r in self.cni.all()}
                           | {n for n in self.attachments.pods if "/" in n})  # fmt: skip
        for name in names:
            want, why = self.wanted(name)
            entry = self.attachments.pods.get(name)
            attached = entry is not None and not entry.draining
            if want and not attached:
                self._attach(name, why)
            elif not want and attached and entry.auto and self.watching and self.synced:
                self._detach(name, why)
            elif attached and self.watching:  # the mode label changed
                mode = self._mode(name)
                if (
                    mode is not None
                    and mode != entry.handle.mode
                    and name not in self.attachments.busy
                ):
                    self.attachments.set_mode(entry, mode)
            if not want:
                self._forget(name)

    def _mode(self, name: str) -> PodMode | None:
        view = self.pods.get(name)
        if view is None:
            return None
        return mode_of(view.labels, self.namespaces.get(name.split("/", 1)[0], {}))

    def retry_pending(self) -> None:
        now = time.monotonic()
        due = [n for n, at in self.pending.items() if at <= now]
        if due:
            self.reconcile(due)

    def _attach(self, name: str, why: str):
        if name in self.attachments.busy:
            return {"pod": name, "attached": False, "reason": "busy"}
        try:
            reply = self.attachments.attach(name, auto=True, mode=self._mode(name))
        except MeshError as exc:
            wait = self.backoff.get(name, RETRY_SECONDS)
            self.pending[name] = time.monotonic() + wait
            self.backoff[name] = min(wait * 2, RETRY_MAX_SECONDS)
            if self.errors.get(name) != str(exc):
                self.errors[name] = str(exc)
                self.log.warning("pod not attached yet", extra={"pod": name, "reason": str(exc)})
            return {"pod": name, "attached": False, "reason": str(exc)}
        self._forget(name)
        self.errors.pop(name, None)
        self.log.info("pod opted in", extra={"pod": name, "reason": why})
        return reply

    def _forget(self, name: str) -> None:
        """No retry pending for this pod (attached, or no longer wanted)."""
        self.pending.pop(name, None)
        self.backoff.pop(name, None)

    def _detach(self, name: str, why: str) -> None:
        if name in self.attachments.busy:
            return
        try:
            self.attachments.detach(name)
        except MeshError as exc:
            self.log.warning("detach failed", extra={"pod": name, "reason": str(exc)})
            return
        self.log.info("pod opted out", extra={"pod": name, "reason": why})

    def snapshot(self) -> dict:
        return {
            "watching": self.watching,
            "synced": self.synced,
            "pods_on_node": len(self.pods),
            "pending": sorted(self.pending),
            "errors": dict(sorted(self.errors.items())),
        }
