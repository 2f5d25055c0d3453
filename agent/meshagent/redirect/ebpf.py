"""The eBPF redirect backend: one map update per pod (netns cookie -> pod)."""

from __future__ import annotations

from meshagent.redirect import OrigLookup, PodHandle


class EbpfBackend:
    name = "ebpf"

    def __init__(self, datapath, port: int) -> None:
        self.datapath = datapath
        self.port = port
        self._attached: set[str] = set()

    def attach(self, pod: PodHandle) -> None:
        self.datapath.set_pod(pod.netns_cookie, pod.pod_id, self.port)
        self._attached.add(pod.name)

    def detach(self, pod: PodHandle, open_connections: bool = False) -> bool:
        """One map delete; open connections need nothing more."""
        self.datapath.del_pod(pod.netns_cookie)
        self._attached.discard(pod.name)
        return False

    def remove(self, pod: str, netns_name: str, quiet: bool = False) -> None:
        pass

    def attached(self) -> set[str]:
        return set(self._attached)

    def lookup(self, pod: PodHandle) -> OrigLookup:
        lookup_orig = self.datapath.lookup_orig
        cookie = pod.netns_cookie
        return lambda _sock, ip, port: lookup_orig(cookie, ip, port)
