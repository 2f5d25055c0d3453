"""bpf/btf.py: member offsets from a BTF blob built here, type by type, in
the kernel's format (Documentation/bpf/btf.rst), and from the running
kernel's own BTF where there is one."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from meshagent.bpf import btf
from meshagent.bpf.btf import BtfError, member_offsets

INT, ARRAY, STRUCT, ENUM = 1, 3, 4, 6


class Blob:
    """A little-endian BTF blob: types in order (ids from 1), strings
    interned in the string section."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")  # offset 0 is the empty name
        self.types = bytearray()

    def name(self, text: str) -> int:
        if not text:
            return 0
        wanted = b"\0" + text.encode() + b"\0"
        at = self.strings.find(wanted)
        if at >= 0:
            return at + 1
        self.strings += text.encode() + b"\0"
        return len(self.strings) - len(text) - 1

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, kind_flag: int = 0,
            extra: bytes = b"") -> None:  # fmt: skip
        info = kind_flag << 31 | kind << 24 | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra

    def int_type(self, name: str, size: int) -> None:
        self.add(INT, name, 0, size, extra=struct.pack("<I", size * 8))  # encoding, 0, bits

    def array(self, elem_type: int, count: int) -> None:
        self.add(ARRAY, "", 0, 0, extra=struct.pack("<III", elem_type, 1, count))

    def enum(self, name: str, values: dict[str, int]) -> None:
        items = b"".join(struct.pack("<Ii", self.name(k), v) for k, v in values.items())
        self.add(ENUM, name, len(values), 4, extra=items)

    def struct_type(self, name: str, size: int, members: list[tuple[str, int, int]],
                    kind_flag: int = 0) -> None:  # fmt: skip
        """members: (name, type id, offset field: bits, or with kind_flag
        bitfield size << 24 | bits)."""
        items = b"".join(struct.pack("<III", self.name(m), t, off) for m, t, off in members)
        self.add(STRUCT, name, len(members), size, kind_flag, items)

    def raw(self, magic: int = btf.MAGIC) -> bytes:
        header = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))  # fmt: skip
        return header + bytes(self.types) + bytes(self.strings)


def sample() -> bytes:
    """int; an enum and an array (kinds with data after the btf_type, to be
    skipped right); struct sock (members named like tcp_sock's, other
    offsets); struct tcp_sock with kind_flag set: snd_una at byte 0, a
    3-bit field `nodelay` at bit 68 (byte 8), bytes_acked at byte 16."""
    blob = Blob()
    blob.int_type("int", 4)  # id 1
    blob.int_type("long long unsigned int", 8)  # id 2
    blob.enum("tcp_ca_state", {"TCP_CA_Open": 0, "TCP_CA_Loss": 4})  # id 3
    blob.array(1, 4)  # id 4: int[4]
    blob.struct_type("sock", 40, [("snd_una", 1, 256), ("bytes_acked", 2, 192)])  # id 5
    blob.struct_type(
        "tcp_sock", 32,
        [("snd_una", 1, 0), ("nodelay", 1, 3 << 24 | 68), ("bytes_acked", 2, 128),
         ("window", 4, 192)],
        kind_flag=1,
    )  # fmt: skip
    return blob.raw()


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(sample())
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def test_member_offsets_are_bytes_in_the_struct_asked_for(blob):
    got = member_offsets("tcp_sock", ("bytes_acked", "snd_una", "window"), blob)
    assert got == {"bytes_acked": 16, "snd_una": 0, "window": 24}
    assert member_offsets("sock", ("snd_una", "bytes_acked"), blob) == {
        "snd_una": 32, "bytes_acked": 24,
    }  # fmt: skip


def test_a_bitfield_offset_drops_its_size_when_kind_flag_is_set(blob):
    assert member_offsets("tcp_sock", ("nodelay",), blob) == {"nodelay": 8}


def test_a_missing_struct_is_one_line(blob):
    with pytest.raises(BtfError) as absent:
        member_offsets("udp_sock", ("bytes_acked",), blob)
    assert one_line(absent) == f"struct udp_sock not in {blob}"
    with pytest.raises(BtfError) as only_a_member:  # the name is there, but no struct has it
        member_offsets("bytes_acked", ("snd_una",), blob)
    assert one_line(only_a_member) == f"struct bytes_acked not in {blob}"
    with pytest.raises(BtfError) as only_an_enum:
        member_offsets("tcp_ca_state", ("TCP_CA_Open",), blob)
    assert one_line(only_an_enum) == f"struct tcp_ca_state not in {blob}"


def test_a_missing_member_is_named(blob):
    with pytest.raises(BtfError) as missing:
        member_offsets("tcp_sock", ("bytes_acked", "bytes_sent", "rtt"), blob)
    assert one_line(missing) == "struct tcp_sock has no bytes_sent, rtt in this kernel's BTF"


def test_a_bad_magic_or_a_short_file_is_not_btf(tmp_path):
    swapped = tmp_path / "big-endian"
    swapped.write_bytes(Blob().raw(magic=0x9FEB))
    with pytest.raises(BtfError) as bad:
        member_offsets("tcp_sock", ("bytes_acked",), swapped)
    assert one_line(bad) == f"{swapped} is not BTF (or not little-endian)"
    short = tmp_path / "short"
    short.write_bytes(sample()[:20])
    with pytest.raises(BtfError) as truncated:
        member_offsets("tcp_sock", ("bytes_acked",), short)
    assert one_line(truncated) == f"{short} is not BTF"


def test_an_unreadable_path_says_why(tmp_path):
    missing = tmp_path / "nosuch"
    with pytest.raises(BtfError) as absent:
        member_offsets("tcp_sock", ("bytes_acked",), missing)
    assert one_line(absent) == f"cannot read {missing}: No such file or directory"
    with pytest.raises(BtfError) as directory:
        member_offsets("tcp_sock", ("bytes_acked",), tmp_path)
    assert one_line(directory) == f"cannot read {tmp_path}: Is a directory"


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason=f"this kernel has no {btf.VMLINUX}")
def test_the_running_kernels_tcp_sock():
    offsets = btf.tcp_sock_offsets()
    assert offsets["bytes_acked"] > 0 and offsets["bytes_acked"] % 8 == 0  # a u64
    assert offsets["write_seq"] % 4 == 0 and offsets["snd_una"] % 4 == 0  # u32s
    # struct sock comes first in tcp_sock: its fields lie before tcp_sock's own
    assert 0 < offsets["sk_wmem_queued"] < offsets["write_seq"]
    assert 0 < offsets["sk_sndbuf"] < offsets["write_seq"]
    flags = btf.cflags()
    assert flags == [f"-D{macro}={offsets[field]}" for field, macro in btf.CFLAGS.items()]
    assert all(re.fullmatch(r"-DMESH_[A-Z_]+=[1-9][0-9]*", flag) for flag in flags)
