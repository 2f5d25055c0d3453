"""The kernel ABI shared with the C in bpf/: map names and the layout of
their keys and values, decision reasons, and the encoders that turn Python
values into map bytes.

The C is the source of truth. tests/unit/test_abi.py checks the names and
reasons against bpf/include/*.h; tests/integration/test_bpf_abi.py checks
every key and value size here against the map the kernel holds after BCC
compiled the C (the compiled object's sizeof).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class MapSpec:
    """One map: its name (at most 15 characters) and the struct of its key
    and value as Python packs them (native order, no padding: '=')."""

    name: str
    key: struct.Struct
    value: struct.Struct
    percpu: bool = False  # the kernel hands out one value per possible CPU


U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
BYTE = struct.Struct("=B")
FD = struct.Struct("=i")  # a sockhash value: the socket's fd (BCC defines it as int)

# struct mesh_pod { u32 pod_id; u16 port; u16 flags; }
POD = struct.Struct("=IHH")
# struct mesh_orig { mesh_addr addr; u16 port; u16 flags; u32 pod_id; u64 netns; u64 cookie; }
ORIG = struct.Struct("=16sHHIQQ")
ORIG_APP = 1  # MESH_ORIG_APP: the pod's socket is in mesh_apphash
# struct mesh_tuple { u64 netns; mesh_addr addr; u16 port; u16 pad1; u32 pad2; }
TUPLE = struct.Struct("=Q16sHHI")
# struct mesh_lpm_key { u32 prefixlen; mesh_addr addr; }
LPM = struct.Struct("=I16s")

# struct mesh_event { u64 netns, cookie; mesh_addr addr; u32 pid; u16 port; u8 kind, reason;
#                     char comm[16]; }
EVENT = struct.Struct("=QQ16sIHBB16s")
# struct mesh_trace_cfg { u32 on; u16 port; u16 pad; u64 netns; }
TRACE_CFG = struct.Struct("=IHHQ")
NOTHING = struct.Struct("=")  # a ring buffer has no keys or values

PODS = MapSpec("mesh_pods", U64, POD)
ORIG_SK = MapSpec("mesh_orig_sk", U64, ORIG)
ORIG_TUP = MapSpec("mesh_orig_tup", TUPLE, ORIG)
ORIG_CLS = MapSpec("mesh_orig_cls", TUPLE, ORIG)
EXCL_PORT = MapSpec("mesh_excl_port", U16, BYTE)
EXCL_CIDR = MapSpec("mesh_excl_cidr", LPM, BYTE)
STATE = MapSpec("mesh_state", U32, U64)
METRICS = MapSpec("mesh_metrics", U32, U64, percpu=True)
SOCKHASH = MapSpec("mesh_sockhash", U64, FD)
PEER = MapSpec("mesh_peer", U64, U64)
PASSED = MapSpec("mesh_passed", U64, U64)
SENT = MapSpec("mesh_sent", U64, U64)
OWN = MapSpec("mesh_own", U64, BYTE)
# struct mesh_msg_pass { u64 passed, app; }; struct mesh_msg_tgt { u64 upstream, via, app; }
MSG_PASS_VALUE = struct.Struct("=QQ")
MSG_TGT_VALUE = struct.Struct("=QQQ")
APPHASH = MapSpec("mesh_apphash", U64, FD)
MSG_PASS = MapSpec("mesh_msg_pass", TUPLE, MSG_PASS_VALUE)
MSG_TGT = MapSpec("mesh_msg_tgt", TUPLE, MSG_TGT_VALUE)
TRACE = MapSpec("mesh_trace", U32, TRACE_CFG)
EVENTS = MapSpec("mesh_events", NOTHING, NOTHING)

MAPS: tuple[MapSpec, ...] = (
    PODS, ORIG_SK, ORIG_TUP, ORIG_CLS, EXCL_PORT, EXCL_CIDR, STATE, METRICS,
    SOCKHASH, PEER, PASSED, SENT, OWN, TRACE, EVENTS, APPHASH, MSG_PASS, MSG_TGT,
)  # fmt: skip
MAP_NAMES = tuple(spec.name for spec in MAPS)

# mesh_state indexes.
STATE_TUP_LIVE = 0
STATE_MSG_ON = 1

# mesh_event kinds (MESH_EV_* in trace.h).
EVENT_KINDS = {1: "connect", 2: "established", 3: "closed"}

# Decision reasons, index = MESH_REASON_* value. Append only.
REASONS = (
    "steered",
    "not_attached",
    "not_tcp",
    "loopback",
    "excluded_port",
    "excluded_cidr",
    "skip_mark",
    "no_listener",
    "map_full",
    "rekeyed",
    "closed",
    "internal",
    "spliced",
    "handoff",
    "eof_drop",
    "redirect_failed",
    "untracked",
    "own_socket",
    "msg_spliced",
)
MAPS_BY_NAME = {spec.name: spec for spec in MAPS}
DIRECTIONS = ("egress", "ingress")


def metric_index(reason: str, direction: str = "egress") -> int:
    return REASONS.index(reason) * len(DIRECTIONS) + DIRECTIONS.index(direction)


# -- encoders -------------------------------------------------------------
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def to_addr16(address: str) -> bytes:
    """'10.0.0.1' -> ::ffff:10.0.0.1 as 16 bytes; IPv6 as is."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    return _MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, address)


def from_addr16(raw: bytes) -> str:
    """The inverse of to_addr16: IPv4-mapped back to dotted IPv4."""
    if raw[:12] == _MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, bytes(raw))


def cidr_lpm_key(cidr: str) -> tuple[int, bytes]:
    """A network as the mesh_excl_cidr trie keys it: (prefix length over the
    16-byte form, 16 address bytes); IPv4 as IPv4-mapped (/n -> /96+n)."""
    net = ipaddress.ip_network(cidr)
    if net.version == 4:
        return 96 + net.prefixlen, _MAPPED_PREFIX + net.network_address.packed
    return net.prefixlen, net.network_address.packed


def cidr_key(cidr: str) -> bytes:
    return LPM.pack(*cidr_lpm_key(cidr))


def pod_value(pod_id: int, port: int) -> bytes:
    return POD.pack(pod_id, port, 0)


def client_key(netns_cookie: int, client_ip: str, client_port: int) -> bytes:
    """The mesh_orig_tup key of a steered connection, by its client end."""
    return TUPLE.pack(netns_cookie, to_addr16(client_ip), client_port, 0, 0)


def orig_dst(value: bytes) -> tuple[str, int]:
    """(address, port) from a mesh_orig value."""
    addr, port, _flags, _pod_id, _netns, _cookie = ORIG.unpack(value)
    return from_addr16(addr), port


def orig_app(value: bytes) -> int | None:
    """The pod socket's cookie, if sock_ops put it into mesh_apphash."""
    _addr, _port, flags, _pod_id, _netns, cookie = ORIG.unpack(value)
    return cookie if flags & ORIG_APP else None


def decode_event(raw: bytes) -> dict:
    """A mesh_event as a dict (names, not numbers)."""
    netns, cookie, addr, pid, port, kind, reason, comm = EVENT.unpack_from(raw)
    return {
        "event": EVENT_KINDS.get(kind, str(kind)),
        "reason": REASONS[reason] if reason < len(REASONS) else str(reason),
        "netns_cookie": netns,
        "socket_cookie": cookie,
        "addr": from_addr16(addr),
        "port": port,
        "pid": pid,
        "comm": comm.split(b"\0", 1)[0].decode(errors="replace"),
    }
