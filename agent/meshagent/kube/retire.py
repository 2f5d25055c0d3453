"""`meshagent retire`: the DaemonSet's preStop, which hands the node over to
a new agent pod instead of ending the forwarded connections.

A DaemonSet's rolling update in Kubernetes 1.20 deletes the old pod and
starts the new one only once the old one is gone: a terminating pod still
counts as the node's, and `maxSurge` for DaemonSets came in 1.21. So the
old pod's preStop takes its pod out of the DaemonSet: it drops the labels
of the DaemonSet's selector, the controller releases the pod and at once
starts a pod of the current template on the node. That pod's agent (`run
--takeover=auto`) takes over the state dir: the old agent hands over its
pods, listeners and connections and exits, nothing reset. This waits for
that (the control socket answering from another process), then returns, and
the kubelet's SIGTERM finds the old agent gone. A `kubectl delete pod` of
the agent hands over the same way. Both pods share the node's network, so
the kubelet's probes of 127.0.0.1:15090 reach whichever agent listens: the
old agent is told first (`retiring`), and answers /readyz with 503, so the
new pod turns ready only once its own agent serves.

There is nothing to hand over to when the DaemonSet is being deleted (an
uninstall) or the pod is not a DaemonSet's: it returns at once and the
agent stops as for a restart. Without a successor within the timeout it
returns too, and the agent stops as for a restart (its connections end).
It never fails the hook: every outcome is one line on stdout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from meshagent.errors import MeshError

RETIRING_LABEL = "meshagent.io/retiring"
POLL = 0.3


def _pid(socket_path: Path) -> int | None:
    from meshagent.client import request

    try:
        return int(request(socket_path, "ping", timeout=5)["pid"])
    except (MeshError, KeyError, TypeError, ValueError):
        return None


def _namespace() -> str:
    from meshagent.kube.watch import SERVICE_ACCOUNT

    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return (SERVICE_ACCOUNT / "namespace").read_text().strip()
    except OSError:
        raise MeshError(
            "POD_NAMESPACE is not set and no service account namespace file: no hand-over"
        ) from None


def release(pod_name: str, namespace: str, client) -> str | None:
    """Take the pod out of its DaemonSet; the DaemonSet's name, or None when
    there is none to hand over to (why, in the MeshError)."""
    from lightkube import ApiError
    from lightkube.resources.apps_v1 import DaemonSet
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    pod = client.get(Pod, pod_name, namespace=namespace)
    owner = next((ref for ref in pod.metadata.ownerReferences or []
                  if ref.kind == "DaemonSet" and ref.controller), None)  # fmt: skip
    if owner is None:
        raise MeshError(f"pod {namespace}/{pod_name} is not a DaemonSet's: no successor comes")
    try:
        ds = client.get(DaemonSet, owner.name, namespace=namespace)
    except ApiError as exc:
        if getattr(exc.status, "code", None) == 404:
            raise MeshError(f"DaemonSet {owner.name} is deleted: no successor comes") from None
        raise
    if ds.metadata.uid != owner.uid or ds.metadata.deletionTimestamp is not None:
        raise MeshError(f"DaemonSet {owner.name} is being deleted: no successor comes")
    selector = dict((ds.spec.selector.matchLabels or {}) if ds.spec.selector else {})
    if not selector:
        raise MeshError(f"DaemonSet {owner.name} selects by expressions only: cannot release")
    labels: dict[str, str | None] = {key: None for key in selector}
    labels[RETIRING_LABEL] = "true"
    client.patch(Pod, pod_name, {"metadata": {"labels": labels}}, namespace=namespace,
                 patch_type=PatchType.MERGE)  # fmt: skip
    return owner.name


def retire(socket_path: Path, timeout: float, say: Callable[[str], None]) -> str:
    """Hand over, or say why not; the outcome in one line."""
    pid = _pid(socket_path)
    if pid is None:
        return "no agent runs on this state dir: nothing to hand over"
    pod_name = os.environ.get("POD_NAME")
    if not pod_name:
        return "POD_NAME is not set (the downward API's metadata.name): no hand-over"
    from meshagent.client import request
    from meshagent.kube.watch import KubeSettings, describe, make_client

    try:
        request(socket_path, "retiring", timeout=5)  # its /readyz: 503 from now on
    except MeshError as exc:
        say(f"the agent did not take the retiring notice ({exc}); going on")
    try:
        namespace = _namespace()
        client = make_client(KubeSettings(node=os.environ.get("NODE_NAME", ""), kubeconfig=None))
        daemonset = release(pod_name, namespace, client)
    except MeshError as exc:
        return f"{exc}; the agent stops as for a restart"
    except Exception as exc:  # an API failure: the hook must not fail
        return f"cannot release the pod ({describe(exc)}); the agent stops as for a restart"
    say(f"pod {namespace}/{pod_name} released from DaemonSet {daemonset}: waiting up to"
        f" {timeout:.0f} s for the new pod's agent to take over from pid {pid}")  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _pid(socket_path)
        if now is not None and now != pid:
            return f"taken over by the agent with pid {now}: no connection was ended"
        time.sleep(POLL)
    return (
        f"no new agent took over in {timeout:.0f} s: the agent stops as for a restart"
        " and its forwarded connections end"
    )
