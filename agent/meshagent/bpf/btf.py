"""Field offsets of kernel structs, read from the running kernel's BTF.

BCC compiles against whatever headers are installed, which need not match
the running kernel (here: Debian's 6.1 headers under a 6.18 kernel), so a
program that reads a kernel struct through a BTF pointer
(bpf_skc_to_tcp_sock) must not take the offset from the headers: the
verifier would accept a read of whatever field sits there. The offsets
come from /sys/kernel/btf/vmlinux instead and enter the C as -D flags.

The format is the kernel's (Documentation/bpf/btf.rst): a header, then
the type section (each type a 12-byte btf_type plus kind-specific data),
then the string section.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from meshagent.errors import MeshError

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F

# kind -> bytes after the 12-byte btf_type (per vlen item when a tuple)
_INT, _ARRAY, _STRUCT, _UNION, _ENUM = 1, 3, 4, 5, 6
_FUNC_PROTO, _VAR, _DATASEC, _DECL_TAG, _ENUM64 = 13, 14, 15, 17, 19
_EXTRA = {_INT: 4, _ARRAY: 12, _VAR: 4, _DECL_TAG: 4}
_PER_ITEM = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, _DATASEC: 12, _ENUM64: 12}


class BtfError(MeshError):
    pass


def member_offsets(
    struct_name: str, members: tuple[str, ...], path: Path = VMLINUX
) -> dict[str, int]:
    """Byte offsets of the named members of `struct struct_name`: its direct
    members, or members of an anonymous struct or union inside it (how
    sock_common holds skc_flags). Raises BtfError (one line) when the BTF,
    the struct or a member is missing."""
    raw, strings, types = _read(path)
    name_of = functools.partial(_name, raw, strings)
    for kind, name_off, info, at in types:
        if kind == _STRUCT and name_of(name_off) == struct_name:
            found: dict[str, int] = {}
            _members(raw, types, name_of, at, info, 0, members, found)
            missing = [m for m in members if m not in found]
            if missing:
                raise BtfError(
                    f"struct {struct_name} has no {', '.join(missing)} in this kernel's BTF"
                )
            return found
    raise BtfError(f"struct {struct_name} not in {path}")


@functools.cache
def _read(path: Path) -> tuple[bytes, int, list[tuple[int, int, int, int]]]:
    """The file, where its strings start, and its types by id (id 0, void,
    is index 0): (kind, name offset, info, where its members start)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BtfError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) < 24:
        raise BtfError(f"{path} is not BTF")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", raw, 0)
    if magic != MAGIC:
        raise BtfError(f"{path} is not BTF (or not little-endian)")
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", raw, 8)
    strings = hdr_len + str_off
    types: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    at, end = hdr_len + type_off, hdr_len + type_off + type_len
    while at < end:
        name_off, info, _size = struct.unpack_from("<III", raw, at)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        at += 12
        types.append((kind, name_off, info, at))
        at += _EXTRA.get(kind, 0) + _PER_ITEM.get(kind, 0) * vlen
    return raw, strings, types


def _name(raw: bytes, strings: int, name_off: int) -> str:
    return raw[strings + name_off : raw.index(b"\0", strings + name_off)].decode()


def _members(raw: bytes, types: list, name_of, at: int, info: int, base: int,
             members: tuple[str, ...], found: dict[str, int]) -> None:  # fmt: skip
    kind_flag, vlen = info >> 31, info & 0xFFFF
    for i in range(vlen):
        name_off, type_id, offset = struct.unpack_from("<III", raw, at + 12 * i)
        bits = base + (offset & 0xFFFFFF if kind_flag else offset)
        if name_off == 0 and type_id < len(types):  # anonymous: look inside
            kind, _n, inner_info, inner_at = types[type_id]
            if kind in (_STRUCT, _UNION):
                _members(raw, types, name_of, inner_at, inner_info, bits, members, found)
            continue
        name = name_of(name_off)
        if name in members and name not in found:
            found[name] = bits // 8


# What the verdict reads of its peer socket, by the -D macro it enters as.
CFLAGS = {
    "bytes_acked": "MESH_TCP_BYTES_ACKED",
    "write_seq": "MESH_TCP_WRITE_SEQ",
    "snd_una": "MESH_TCP_SND_UNA",
    "copied_seq": "MESH_TCP_COPIED_SEQ",
    "rcv_nxt": "MESH_TCP_RCV_NXT",
    "bytes_received": "MESH_TCP_BYTES_RECEIVED",
    "sk_rmem_alloc": "MESH_SK_RMEM_ALLOC",
    "sk_rcvbuf": "MESH_SK_RCVBUF",
    "sk_wmem_queued": "MESH_SK_WMEM_QUEUED",
    "sk_sndbuf": "MESH_SK_SNDBUF",
    "sk_flags": "MESH_SK_FLAGS",
    "sk_err": "MESH_SK_ERR",
}


@functools.cache
def tcp_sock_offsets() -> dict[str, int]:
    """Offsets in struct tcp_sock of what the verdict reads (bpf/skb_verdict.c):
    tcp_sock's own fields, and struct sock's, which tcp_sock embeds first
    (tcp_sock.inet_conn.icsk_inet.sk; each checked to be at offset 0)."""
    out = member_offsets("tcp_sock", ("inet_conn", "bytes_acked", "write_seq", "snd_una",
                                      "copied_seq", "rcv_nxt", "bytes_received"))  # fmt: skip
    chain = (out.pop("inet_conn"), member_offsets("inet_connection_sock", ("icsk_inet",))["icsk_inet"],
             member_offsets("inet_sock", ("sk",))["sk"])  # fmt: skip
    if any(chain):
        raise BtfError("struct sock is not at the start of struct tcp_sock in this kernel's BTF")
    out.update(member_offsets("sock", ("__sk_common", "sk_wmem_queued", "sk_sndbuf", "sk_err",
                                       "sk_rcvbuf", "sk_backlog")))  # fmt: skip
    # sk_rmem_alloc is sk_backlog.rmem_alloc, its first member (since 2.6)
    out["sk_rmem_alloc"] = out.pop("sk_backlog")
    if out.pop("__sk_common"):
        raise BtfError("struct sock_common is not at the start of struct sock in this kernel's BTF")
    out["sk_flags"] = member_offsets("sock_common", ("skc_flags",))["skc_flags"]
    return out


def cflags() -> list[str]:
    """-D flags for the offsets, or none when this kernel has no BTF (the
    plan then keeps the sockmap path off: it could not be bounded)."""
    try:
        offsets = tcp_sock_offsets()
    except BtfError:
        return []
    return [f"-D{macro}={offsets[field]}" for field, macro in CFLAGS.items()]
