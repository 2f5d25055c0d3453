"""bpf(2) by number: the number comes from a table per machine, and any
other machine is refused in one line before a system call is made."""

from __future__ import annotations

import pytest

from meshagent.bpf import syscall as sc
from meshagent.errors import MeshError


@pytest.mark.parametrize(
    ("machine", "number"),
    [("x86_64", 321), ("aarch64", 280), ("riscv64", 280), ("ppc64le", 361), ("s390x", 351)],
)
def test_the_bpf_syscall_number_of_each_known_machine(machine, number):
    assert sc.bpf_syscall_number(machine) == number


@pytest.mark.parametrize(("machine", "bits"), [("sparc64", 64), ("mips64", 64), ("x86_64", 32)])
def test_an_unknown_architecture_is_refused_in_one_line(machine, bits):
    with pytest.raises(
        MeshError, match=f"unsupported architecture {machine} \\({bits}-bit\\)"
    ) as exc:
        sc.bpf_syscall_number(machine, bits)
    assert "\n" not in str(exc.value)


def test_no_system_call_is_made_on_an_unknown_architecture(monkeypatch):
    def no_syscall(*_args):
        raise AssertionError("a system call was made")

    monkeypatch.setattr(sc, "SYS_BPF", -1)
    monkeypatch.setattr(sc, "MACHINE", "sparc64")
    monkeypatch.setattr(sc._libc, "syscall", no_syscall)
    with pytest.raises(MeshError, match="unsupported architecture sparc64"):
        sc.map_info(0)
    with pytest.raises(MeshError, match="sparc64"):
        sc.prog_load(sc.PROG_TYPES["sk_skb"], b"")
