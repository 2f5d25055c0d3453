"""Both redirect backends implement the whole `Backend` protocol, so the
attachments call every member plainly; the ebpf backend's map work is
checked against dict-backed maps (no kernel); and what the forwarder shares
with them (meshagent.steering) lies below both."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import meshagent
from meshagent.bpf import abi
from meshagent.redirect import Backend
from meshagent.redirect.ebpf import EbpfBackend
from meshagent.redirect.iptables import IptablesBackend, Tools
from meshagent.redirect.rules import RuleConfig
from meshagent.steering import PodHandle

BACKENDS = (EbpfBackend, IptablesBackend)


def protocol_members() -> dict[str, object]:
    """Backend's members: its annotated attributes and its methods."""
    members: dict[str, object] = dict.fromkeys(Backend.__annotations__)
    for name, value in vars(Backend).items():
        if inspect.isfunction(value) and not name.startswith("_"):
            members[name] = value
    return members


def test_protocol_has_what_attachments_call():
    assert {"reconcile", "keep_stopped", "flavour", "blocking"} <= set(protocol_members())


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_backend_has_every_member(cls):
    for name, declared in protocol_members().items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        if declared is None:
            continue
        params = list(inspect.signature(getattr(cls, name)).parameters)
        assert params == list(inspect.signature(declared).parameters), f"{cls.__name__}.{name}"


class DictMap:
    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: dict[bytes, bytes] = {}

    def list_keys(self) -> list[bytes]:
        return list(self.entries)

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def update(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def delete(self, key: bytes) -> bool:
        return self.entries.pop(key, None) is not None

    def count(self) -> int:
        return len(self.entries)


class DictLoaded:
    def __init__(self) -> None:
        self.maps: dict[str, DictMap] = {}

    def map(self, name: str) -> DictMap:
        return self.maps.setdefault(name, DictMap(name))


def pod(name: str, cookie: int, pod_id: int = 1) -> PodHandle:
    return PodHandle(name, f"ns-{name}", -1, pod_id, _cookie=cookie)


@pytest.fixture
def ebpf() -> EbpfBackend:
    return EbpfBackend(DictLoaded(), 15001, (), ())  # type: ignore[arg-type]


def test_ebpf_reconcile_removes_other_pods(ebpf):
    kept, gone = pod("web", 11), pod("old", 22, 2)
    ebpf.attach(kept)
    ebpf.attach(gone)
    assert ebpf.reconcile([kept]) == [22]
    assert ebpf.pods.list_keys() == [abi.U64.pack(11)]


def test_ebpf_keep_stopped_leaves_the_pod_out_until_attach(ebpf):
    web = pod("web", 11)
    ebpf.keep_stopped(web)  # taken over while draining: not in mesh_pods
    assert ebpf.pods.count() == 0
    ebpf.attach(web)
    assert ebpf.pods.count() == 1


def test_ebpf_shares_split_half_the_map_among_attached_pods(ebpf):
    """Each attached pod's share of mesh_orig_tup, rewritten as pods come
    and go: together the shares stay under half the map (the other half
    is what pods past their share may borrow)."""
    ebpf.conns_max = 1024
    web, db = pod("web", 11), pod("db", 22, 2)
    ebpf.attach(web)
    assert ebpf.shares.lookup(abi.U64.pack(11)) == abi.U64.pack(ebpf.share(1))
    ebpf.attach(db)
    both = abi.U64.pack(ebpf.share(2))
    assert ebpf.shares.lookup(abi.U64.pack(11)) == ebpf.shares.lookup(abi.U64.pack(22)) == both
    assert 2 * ebpf.share(2) <= 1024 // 2 - 8
    ebpf.stop_new(db)
    assert ebpf.shares.list_keys() == [abi.U64.pack(11)]
    assert ebpf.shares.lookup(abi.U64.pack(11)) == abi.U64.pack(ebpf.share(1))


def test_iptables_has_no_residue_outside_pods():
    tools = Tools("nft", "/r4", "/r6", "/s4", "/s6")
    backend = IptablesBackend(RuleConfig(port=15001, skip_cgroup="/agent"), tools)
    assert backend.flavour == "nft"
    assert backend.reconcile([pod("web", 11)]) == []
    backend.keep_stopped(pod("web", 11))  # nothing to do, and no subprocess
    assert EbpfBackend.flavour is None


def imported(path) -> set[str]:
    """The meshagent modules a source file imports (at any depth)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("meshagent.")}


def test_steering_is_below_both_forwarder_and_redirect():
    root = Path(meshagent.__file__).parent
    low = imported(root / "steering.py")
    assert not {m for m in low if m.startswith(("meshagent.forwarder", "meshagent.redirect"))}
    for path in sorted((root / "forwarder").glob("*.py")):
        up = {m for m in imported(path) if m.startswith("meshagent.redirect")}
        assert not up, f"forwarder/{path.name} imports {sorted(up)}"
