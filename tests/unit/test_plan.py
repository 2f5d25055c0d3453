"""plan(probe, config) over a table of kernels, without root: what `run`
and `probe-kernel` would pick on each, and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshagent.bpf.features import from_version, version
from meshagent.config import AgentConfig
from meshagent.kernel import Feature, evaluate
from meshagent.modes import Backend, DataPathMode
from meshagent.plan import plan

KERNELS = json.loads((Path(__file__).parent / "kernels" / "kernels.json").read_text())
HOST_OK = {
    name: Feature(True, "test")
    for name in ("cgroup2", "btf", "tcp_sock_btf", "kernel_headers", "bcc", "iptables", "splice")
}


def probe_of(kernel: str, **host_off: bool):
    host = dict(HOST_OK)
    for name in host_off:
        host[name] = Feature(False, f"no {name} (test)")
    return evaluate(KERNELS[kernel], host, iptables_flavour="nft")


def cfg(**kwargs) -> AgentConfig:
    return AgentConfig(**kwargs)


# kernel: (auto backend, first data path auto tries, a word the backend reason holds)
EXPECTED = {
    "4.19": (Backend.IPTABLES, DataPathMode.SPLICE, "netns_cookie"),
    "5.4": (Backend.IPTABLES, DataPathMode.SPLICE, "netns_cookie"),
    "5.10": (Backend.IPTABLES, DataPathMode.SPLICE, "netns_cookie_sock_ops"),
    "5.15": (Backend.EBPF, DataPathMode.SOCKMAP, "every program"),
    "6.1": (Backend.EBPF, DataPathMode.SOCKMAP, "every program"),
    "6.12": (Backend.EBPF, DataPathMode.SOCKMAP, "every program"),
    "6.18": (Backend.EBPF, DataPathMode.SOCKMAP, "every program"),
}


@pytest.mark.parametrize("kernel", sorted(EXPECTED, key=lambda k: version(k)))
def test_auto_on_each_kernel(kernel):
    backend, datapath, why = EXPECTED[kernel]
    chosen = plan(probe_of(kernel), cfg())
    assert chosen.error is None
    assert chosen.backend is backend
    assert why in chosen.backend_reason
    assert chosen.datapaths[0] is datapath
    assert chosen.datapaths[-1] is DataPathMode.COPY
    names = {p.name for p in chosen.programs}
    assert ("mesh_sockops" in names) == (backend is Backend.EBPF)
    assert ("mesh_verdict" in names) == (datapath is DataPathMode.SOCKMAP)


def test_5_10_is_the_case_that_broke():
    """On 5.10 sock_ops cannot call bpf_get_netns_cookie and SO_NETNS_COOKIE
    is missing: auto uses iptables, and --redirect ebpf says exactly why."""
    chosen = plan(probe_of("5.10"), cfg(redirect="ebpf"))
    assert chosen.backend is None
    assert "netns_cookie_sock_ops" in chosen.error and "so_netns_cookie" in chosen.error
    assert "mesh_sockops" not in {p.name for p in chosen.programs}
    assert plan(probe_of("5.10"), cfg(redirect="iptables")).backends == (Backend.IPTABLES,)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_the_feature_table_agrees_with_each_kernel(kernel):
    """from_version() (the fallback when not root) derives what each
    fixture lists, feature by feature."""
    from meshagent.bpf.features import features

    derived = features(from_version(version(KERNELS[kernel]["kernel"])))
    listed = features(KERNELS[kernel])
    assert {k: v[0] for k, v in derived.items()} == {k: v[0] for k, v in listed.items()}


def test_no_bcc_or_no_headers_fall_back_and_say_which():
    for missing in ("bcc", "kernel_headers"):
        chosen = plan(probe_of("6.18", **{missing: False}), cfg())
        assert chosen.backend is Backend.IPTABLES
        assert missing in chosen.backend_reason
        assert chosen.datapaths[0] is DataPathMode.SPLICE
        assert missing in chosen.datapath_reason
        assert chosen.programs == ()
    headers = plan(probe_of("6.18", kernel_headers=False), cfg(redirect="ebpf"))
    assert "kernel headers" in headers.error and "scripts/bootstrap" in headers.error
    bcc = plan(probe_of("6.18", bcc=False), cfg(redirect="ebpf"))
    assert "python3-bpfcc" in bcc.error and "scripts/bootstrap" in bcc.error


def test_no_iptables():
    assert plan(probe_of("6.18", iptables=False), cfg()).backends == (Backend.EBPF,)
    old = plan(probe_of("5.10", iptables=False), cfg())
    assert old.backend is None and old.error.startswith("no redirect backend")
    explicit = plan(probe_of("6.18", iptables=False), cfg(redirect="iptables"))
    assert explicit.error.startswith("--redirect iptables")


def test_no_splice_means_copy():
    chosen = plan(probe_of("5.10", splice=False), cfg())
    assert chosen.datapaths == (DataPathMode.COPY,)
    assert "not available" in plan(probe_of("5.10", splice=False), cfg(datapath="splice")).error


def test_explicit_datapath():
    assert plan(probe_of("6.18"), cfg(datapath="copy")).datapaths == (DataPathMode.COPY,)
    error = plan(probe_of("5.10"), cfg(datapath="sockmap")).error
    assert error.startswith("--datapath sockmap: not available") and "atomic_fetch" in error


def test_a_refused_program_falls_through_under_auto_and_is_an_error_when_asked_for():
    reason = "mesh_sockops (sockops.c) refused by the kernel: unknown func bpf_get_netns_cookie#122"
    refused = probe_of("6.18").with_refused({"mesh_sockops": reason})
    auto = plan(refused, cfg())
    assert auto.backend is Backend.IPTABLES
    assert auto.backend_reason == f"ebpf unavailable: {reason}"
    assert [p.name for p in auto.programs] == ["mesh_verdict"]  # sockmap still works
    assert reason in plan(refused, cfg(redirect="ebpf")).error
    verdict = probe_of("6.18").with_refused({"mesh_verdict": "mesh_verdict refused: x"})
    chosen = plan(verdict, cfg())
    assert chosen.backend is Backend.EBPF and chosen.datapaths[0] is DataPathMode.SPLICE
    assert "mesh_verdict refused" in chosen.datapath_reason


def test_optional_getpeername_hooks_are_a_note():
    probe = evaluate(KERNELS["6.18"], HOST_OK, without=("getpeername_hooks",))
    chosen = plan(probe, cfg())
    assert chosen.backend is Backend.EBPF
    assert not {"mesh_getpeer4", "mesh_getpeer6"} & {p.name for p in chosen.programs}
    assert any("getpeername_hooks" in note for note in chosen.notes)


def test_without_turns_features_off_and_unknown_names_are_refused():
    from meshagent.errors import MeshError

    probe = evaluate(KERNELS["6.18"], HOST_OK, without=("netns_cookie", "sockhash"))
    chosen = plan(probe, cfg())
    assert chosen.backend is Backend.IPTABLES and "netns_cookie" in chosen.backend_reason
    assert chosen.datapaths[0] is DataPathMode.SPLICE
    with pytest.raises(MeshError, match="unknown feature"):
        evaluate(KERNELS["6.18"], HOST_OK, without=("warp_drive",))
