"""Names shared with the C in bpf/: maps, programs and decision reasons.

The C is the source of truth; tests/unit/test_names.py checks this module
against bpf/include/*.h so the two never drift.
"""

from __future__ import annotations

# Every map, as named in bpf/include/maps.h (at most 15 characters).
MAP_PODS = "mesh_pods"
MAP_ORIG_SK = "mesh_orig_sk"
MAP_ORIG_TUP = "mesh_orig_tup"
MAP_EXCL_PORT = "mesh_excl_port"
MAP_EXCL_CIDR = "mesh_excl_cidr"
MAP_STATE = "mesh_state"
MAP_METRICS = "mesh_metrics"
MAP_SOCKHASH = "mesh_sockhash"
MAP_PEER = "mesh_peer"
MAP_PASSED = "mesh_passed"
MAP_SENT = "mesh_sent"
MAPS = (
    MAP_PODS,
    MAP_ORIG_SK,
    MAP_ORIG_TUP,
    MAP_EXCL_PORT,
    MAP_EXCL_CIDR,
    MAP_STATE,
    MAP_METRICS,
    MAP_SOCKHASH,
    MAP_PEER,
    MAP_PASSED,
    MAP_SENT,
)

# Entry functions, one per attach point, with their source file.
PROG_CONNECT4 = "mesh_connect4"
PROG_CONNECT6 = "mesh_connect6"
PROG_SOCKOPS = "mesh_sockops"
PROG_VERDICT = "mesh_verdict"
PROG_GETPEER4 = "mesh_getpeer4"
PROG_GETPEER6 = "mesh_getpeer6"
PROGRAM_FILES = {
    PROG_CONNECT4: "connect4.c",
    PROG_CONNECT6: "connect6.c",
    PROG_SOCKOPS: "sockops.c",
    PROG_VERDICT: "skb_verdict.c",
    PROG_GETPEER4: "getpeername4.c",
    PROG_GETPEER6: "getpeername6.c",
}

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
)
DIRECTIONS = ("egress", "ingress")

# mesh_state indexes.
STATE_TUP_LIVE = 0
