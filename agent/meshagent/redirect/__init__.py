"""Redirect backends: how an attached pod's connects reach its forwarder.

`ebpf` (cgroup connect hooks, one map entry per pod) and `iptables` (nat
OUTPUT REDIRECT rules inside the pod's netns) share one interface; each
gives the forwarder the pod's `Steering` (meshagent.steering), which it asks
where each accepted connection was going.
"""

from __future__ import annotations

from typing import Protocol

from meshagent.modes import Backend as BackendName
from meshagent.steering import PodHandle, Steering


class Backend(Protocol):
    name: BackendName
    # attach/stop_new/remove block (subprocesses): the agent runs them in a
    # worker thread, so they must touch nothing of the loop's
    blocking: bool
    # The iptables flavour holding the pods' rules, saved with each pod so
    # that cleanup removes them with the same tools; None: no rules.
    flavour: str | None

    def attach(self, pod: PodHandle) -> None: ...

    def stop_new(self, pod: PodHandle) -> None:
        """New connections go direct from now on; redirected ones keep going."""
        ...

    def remove(
        self, pod: str, netns_name: str, quiet: bool = False, netns_fd: int | None = None
    ) -> None:
        """Take away what attach made; in netns_fd when given (an attached
        pod's, held since attach), else in the netns at netns_name."""
        ...

    def steering(self, pod: PodHandle) -> Steering: ...

    def snapshot(self) -> dict: ...

    def reconcile(self, pods: list[PodHandle]) -> list[int]:
        """Adopted these pods: remove what an earlier agent left for others
        (pods since deleted). The netns cookies of what was removed."""
        ...

    def keep_stopped(self, pod: PodHandle) -> None:
        """A pod taken over while it was being detached: its new connections
        stay direct."""
        ...

    def listening(self, pod: PodHandle) -> None:
        """The forwarder listens for the pod (pod.listeners, pod.port): a
        pod handed over with its listeners (attach does this itself)."""
        ...

    def refresh(self, pod: PodHandle) -> None:
        """A pod taken over while attached: whatever in its steering names
        the agent it came from is made to name this one."""
        ...
