"""The kernel ABI shared with the C in bpf/: map names and the layout of
their keys and values, decision reasons, and the encoders that turn Python
values into map bytes.

The C is the source of truth. tests/unit/test_abi.py checks the names,
reasons and struct fields against bpf/include/*.h. Every load checks each
map's key and value here against what BCC compiled, as Cilium's
alignchecker does: sizes against the map the kernel holds, and the offset
and size of every field of a struct against the compiled object's layout
(bpf/build.py records it); tests/integration/test_plan_kernel.py runs it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

Field = tuple[str, int, int]  # one member of a C struct: (name, offset, size)
Layout = tuple[str, tuple[Field, ...]]  # a struct as compiled: (its C name, its fields)


class CStruct:
    """A struct shared with the C (bpf/include/maps.h) as Python packs it:
    its C name and its fields in order, each with its struct format (native
    order, no padding: '='). Packs and unpacks as the struct.Struct it holds."""

    def __init__(self, name: str, *fields: tuple[str, str]) -> None:
        self.name = name
        self.fields = fields
        self.struct = struct.Struct("=" + "".join(fmt for _field, fmt in fields))
        self.size = self.struct.size
        self.pack = self.struct.pack
        self.unpack = self.struct.unpack
        self.unpack_from = self.struct.unpack_from

    def layout(self) -> tuple[Field, ...]:
        """(name, offset, size) of each field, as Python packs it."""
        out: list[Field] = []
        offset = 0
        for name, fmt in self.fields:
            size = struct.calcsize("=" + fmt)
            out.append((name, offset, size))
            offset += size
        return tuple(out)


@dataclass(frozen=True)
class MapSpec:
    """One map: its name (at most 15 characters) and its key and value as
    Python packs them: a C struct (CStruct) or a scalar (struct.Struct)."""

    name: str
    key: struct.Struct | CStruct
    value: struct.Struct | CStruct
    percpu: bool = False  # the kernel hands out one value per possible CPU


U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
S64 = struct.Struct("=q")  # a counter the hooks may have taken below 0
BYTE = struct.Struct("=B")
FD = struct.Struct("=i")  # a sockhash value: the socket's fd (BCC defines it as int)

POD = CStruct("mesh_pod", ("pod_id", "I"), ("port", "H"), ("flags", "H"))
ORIG = CStruct(
    "mesh_orig",
    ("addr", "16s"), ("port", "H"), ("flags", "H"), ("pod_id", "I"), ("netns", "Q"),
    ("cookie", "Q"),
)  # fmt: skip
ORIG_APP = 1  # MESH_ORIG_APP: the pod's socket is in mesh_apphash
TUPLE = CStruct(
    "mesh_tuple", ("netns", "Q"), ("addr", "16s"), ("port", "H"), ("pad1", "H"), ("pad2", "I")
)
LPM = CStruct("mesh_lpm_key", ("prefixlen", "I"), ("addr", "16s"))
EVENT = CStruct(
    "mesh_event",
    ("netns", "Q"), ("cookie", "Q"), ("addr", "16s"), ("pid", "I"), ("port", "H"),
    ("kind", "B"), ("reason", "B"), ("comm", "16s"), ("rule", "I"), ("pad", "I"),
)  # fmt: skip
EVENT_BEFORE_RULE = 56  # an older agent's events end at comm
POL_KEY = CStruct("mesh_pol_key", ("prefixlen", "I"), ("gen", "I"), ("netns", "Q"), ("addr", "16s"))
POL_RULES = 16  # MESH_POL_RULES
POL_VAL = CStruct("mesh_pol_val", ("n", "I"), ("pad", "I"), ("r", f"{POL_RULES}Q"))
TRACE_CFG = CStruct("mesh_trace_cfg", ("on", "I"), ("port", "H"), ("pad", "H"), ("netns", "Q"))
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
LSN4 = MapSpec("mesh_lsn4", U64, FD)  # netns cookie -> the forwarder's listener there
LSN6 = MapSpec("mesh_lsn6", U64, FD)
POD_LIVE = MapSpec("mesh_pod_live", U64, U64)  # netns cookie -> its mesh_orig_tup entries
POD_SHARE = MapSpec("mesh_pod_share", U64, U64)  # netns cookie -> its guaranteed share
PEER = MapSpec("mesh_peer", U64, U64)
PASSED = MapSpec("mesh_passed", U64, U64)
SENT = MapSpec("mesh_sent", U64, U64)
REDIR = MapSpec("mesh_redir", U64, U64)
FLIGHT = MapSpec("mesh_flight", U64, U64)
SEQ = MapSpec("mesh_seq", U64, U64)  # socket cookie -> TCP sequence number of its next new byte
SEQ_LOST = 1 << 32  # in a mesh_seq value: the verdict dropped a segment (MESH_SEQ_LOST)
SEQ_COPIED = 1 << 33  # made so by Python: N starts at the socket's copied_seq (MESH_SEQ_COPIED)
WAKE = MapSpec("mesh_wake", NOTHING, NOTHING)
OWN = MapSpec("mesh_own", U64, BYTE)
MSG_PASS_VALUE = CStruct("mesh_msg_pass", ("passed", "Q"), ("app", "Q"))
MSG_TGT_VALUE = CStruct("mesh_msg_tgt", ("upstream", "Q"), ("via", "Q"), ("app", "Q"))
APPHASH = MapSpec("mesh_apphash", U64, FD)
# A mesh_own value: the server's replies may go straight into the pod (MESH_OWN_REPLIES).
OWN_REPLIES = 2
PAIR = CStruct("mesh_pair", ("local", "16s"), ("remote", "16s"), ("lport", "H"), ("rport", "H"),
               ("pad", "I"))  # fmt: skip
REPLY_VALUE = CStruct("mesh_reply", ("app", "Q"), ("ingress", "Q"))
RARM_VALUE = CStruct("mesh_rarm", ("armed", "Q"), ("budget", "q"), ("v_stream", "Q"))
RARM_OFF = (1 << 64) - 1  # MESH_RARM_OFF
RARM = MapSpec("mesh_rarm", U64, RARM_VALUE)  # the pod's socket's cookie -> its replies' arming
# Upstream sockets marked OWN_REPLIES, from connect to established.
UPSK = MapSpec("mesh_upsk", U64, BYTE)
# A server's end of a forwarded connection -> the pod's socket, the bytes put there.
REPLY = MapSpec("mesh_reply", PAIR, REPLY_VALUE)
MSG_PASS = MapSpec("mesh_msg_pass", TUPLE, MSG_PASS_VALUE)
MSG_TGT = MapSpec("mesh_msg_tgt", TUPLE, MSG_TGT_VALUE)
TRACE = MapSpec("mesh_trace", U32, TRACE_CFG)
EVENTS = MapSpec("mesh_events", NOTHING, NOTHING)
POL_CIDR = MapSpec("mesh_pol_cidr", POL_KEY, POL_VAL)  # (generation, pod, prefix) -> its rules
POL_GEN = MapSpec("mesh_pol_gen", U32, U32)  # [0]: the rule set's generation in force
KCONN_VALUE = CStruct(
    "mesh_kconn",
    ("started", "Q"), ("netns", "Q"), ("addr", "16s"), ("pod_id", "I"), ("port", "H"),
    ("flags", "B"), ("closer", "B"),
)  # fmt: skip
KDONE_RECORD = CStruct(
    "mesh_kdone",
    ("netns", "Q"), ("cookie", "Q"), ("started", "Q"), ("ended", "Q"), ("sent", "Q"),
    ("rcvd", "Q"), ("addr", "16s"), ("src", "16s"), ("pod_id", "I"), ("err", "i"),
    ("port", "H"), ("sport", "H"), ("flags", "B"), ("closer", "B"), ("last", "B"),
    ("pad", "B"),
)  # fmt: skip
KCONN = MapSpec("mesh_kconn", U64, KCONN_VALUE)  # socket cookie -> a kernel-mode connection
KDONE = MapSpec("mesh_kdone", NOTHING, NOTHING)  # their records at close (KDONE_RECORD)
KFWD = MapSpec("mesh_kfwd", LPM, BYTE)  # destinations kernel-mode pods still forward
KLIVE = MapSpec("mesh_klive", U64, S64)  # netns cookie -> its kernel-mode connections up
POD_KERNEL = 1  # mesh_pod.flags: MESH_POD_KERNEL
KC_UP, KC_FIN_OUT, KC_FIN_IN, KC_EXACT = 1, 2, 4, 8  # MESH_KC_*
KC_BY = {0: None, 1: "pod", 2: "upstream"}  # MESH_KC_BY_*
TCP_STATES = {1: "established", 2: "syn_sent", 4: "fin_wait1", 5: "fin_wait2", 7: "close",
              8: "close_wait", 9: "last_ack", 11: "closing"}  # BPF_TCP_* # fmt: skip

MAPS: tuple[MapSpec, ...] = (
    PODS, ORIG_SK, ORIG_TUP, ORIG_CLS, EXCL_PORT, EXCL_CIDR, STATE, METRICS,
    SOCKHASH, PEER, PASSED, SENT, OWN, TRACE, EVENTS, APPHASH, MSG_PASS, MSG_TGT, REDIR,
    FLIGHT, WAKE, LSN4, LSN6, POD_LIVE, POD_SHARE, SEQ, POL_CIDR, POL_GEN, KCONN, KDONE,
    KFWD, KLIVE, UPSK, REPLY, RARM,
)  # fmt: skip
MAP_NAMES = tuple(spec.name for spec in MAPS)


def check_layouts(spec: MapSpec, key: Layout | None, value: Layout | None) -> None:
    """ValueError naming every field of the map's key and value whose
    offset or size as compiled (key, value) differs from Python's."""
    problems = layout_differences(spec.key, key) + layout_differences(spec.value, value)
    if problems:
        raise ValueError(f"map {spec.name}: " + "; ".join(problems))


def layout_differences(python: struct.Struct | CStruct, compiled: Layout | None) -> list[str]:
    """How a key or value as compiled (its struct's C name and fields, or
    None for a scalar) differs from what Python packs: the struct, and each
    field's offset and size. Padding the compiler put in shows as a field at
    another offset (Python packs none). Scalars are checked by size alone."""
    python_name = python.name if isinstance(python, CStruct) else None
    c_name = compiled[0] if compiled is not None else None
    if python_name != c_name:
        return [f"Python packs {_struct(python_name)}, the compiled C has {_struct(c_name)}"]
    if not isinstance(python, CStruct) or compiled is None:
        return []  # scalars: their size is checked against the map
    c_fields = compiled[1]
    in_c = {name: (offset, size) for name, offset, size in c_fields if not name.startswith("__pad")}
    out = []
    for name, offset, size in python.layout():
        if name not in in_c:
            out.append(f"{c_name}.{name} is not in the compiled C")
            continue
        c_offset, c_size = in_c.pop(name)
        if (c_offset, c_size) != (offset, size):
            out.append(
                f"{c_name}.{name}: Python packs {size} bytes at offset {offset},"
                f" the compiled C has {c_size} at {c_offset}"
            )
    out += [
        f"{c_name}.{name} (offset {offset}) is not packed by Python"
        for name, (offset, _s) in in_c.items()
    ]
    return out


def _struct(name: str | None) -> str:
    return f"struct {name}" if name else "a scalar"


# mesh_state indexes.
STATE_TUP_LIVE = 0
STATE_MSG_ON = 1
STATE_KDONE_OUT = 2  # records sock_ops put into mesh_kdone, ever
STATE_KDONE_READ = 3  # ... and the agent read

# mesh_event kinds (MESH_EV_* in trace.h).
EVENT_KINDS = {1: "connect", 2: "established", 3: "closed"}

# Decision reasons, index = MESH_REASON_* value. Append only; a reason no
# hook counts any more keeps its number (reserved in reasons.h).
REASONS = (
    "steered",
    "not_attached",
    "not_tcp",
    "loopback",
    "excluded_port",
    "excluded_cidr",
    "skip_mark",  # reserved: never counted
    "no_listener",
    "map_full",
    "rekeyed",
    "closed",
    "internal",  # reserved: never counted
    "spliced",
    "handoff",
    "eof_drop",
    "redirect_failed",
    "untracked",
    "own_socket",
    "msg_spliced",
    "throttled",
    "wake_lost",
    "pod_quota",
    "msg_drift",
    "overlap",
    "overlap_lost",
    "seq_unknown",
    "denied_policy",
    "kernel",
    "acct_lost",
    "msg_ingress",
    "reply_held",
)
MAPS_BY_NAME = {spec.name: spec for spec in MAPS}
# mesh_metrics counts by reason (index = MESH_REASON_*); every decision is of
# an outbound connection, and status shows its count under this direction.
DIRECTION = "egress"


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


def pod_value(pod_id: int, port: int, kernel: bool = False) -> bytes:
    return POD.pack(pod_id, port, POD_KERNEL if kernel else 0)


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
    if len(raw) >= EVENT.size:
        netns, cookie, addr, pid, port, kind, reason, comm, rule, _pad = EVENT.unpack_from(raw)
    else:  # an older agent's hooks: no rule
        raw = bytes(raw[:EVENT_BEFORE_RULE]).ljust(EVENT.size, b"\0")
        netns, cookie, addr, pid, port, kind, reason, comm, rule, _pad = EVENT.unpack_from(raw)
    return {
        "rule": rule >> 16,  # the policy rule's number (0: the default deny)
        "rule_gen": rule & 0xFFFF,
        "event": EVENT_KINDS.get(kind, str(kind)),
        "reason": REASONS[reason] if reason < len(REASONS) else str(reason),
        "netns_cookie": netns,
        "socket_cookie": cookie,
        "addr": from_addr16(addr),
        "port": port,
        "pid": pid,
        "comm": comm.split(b"\0", 1)[0].decode(errors="replace"),
    }
