"""Which kernels the stream verdict checks for repeated bytes, and how
(meshagent.bpf.features.seq_check; bpf/skb_verdict.c, MESH_SEQ_CHECK)."""

from __future__ import annotations

import pytest

from meshagent.bpf.features import full_version, seq_check

DEBIAN_61 = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.140-1 (2025-05-22)"


@pytest.mark.parametrize(
    ("release", "build", "full"),
    [
        ("6.1.0-57-amd64", DEBIAN_61, (6, 1, 140)),  # Debian hides the sublevel in the release
        ("6.12.117+deb12-amd64", "#1 SMP Debian 6.12.117-1", (6, 12, 117)),
        ("6.18.44-fc-v1252", "#1 SMP PREEMPT_DYNAMIC @0", (6, 18, 44)),
        ("6.2.0-39-generic", "#40-Ubuntu SMP", None),  # 6.2.0 is not the sublevel
        ("5.10.0-32-amd64", "#1 SMP", None),
    ],
)
def test_the_full_version_comes_from_the_release_or_the_build(release, build, full):
    assert full_version(release, build) == full


@pytest.mark.parametrize(
    ("release", "build", "mode"),
    [
        ("5.10.0-32-amd64", "#1 SMP", 0),  # skb->cb seen 8 bytes on: not checked
        ("5.15.0-1-amd64", "#1 SMP", 0),
        ("5.19.3", "#1", 2),  # tcp_read_sock: the skb is a clone of its own
        ("6.0.2", "#1", 1),  # the verdict's caller holds a second reference: reset only
        ("6.1.0-9-amd64", "#1 SMP Debian 6.1.27-1", 1),
        ("6.1.0-57-amd64", DEBIAN_61, 2),  # 6.1.31 and later dropped it
        ("6.2.0-39-generic", "#40-Ubuntu SMP", 1),  # sublevel unknown: the safe side
        ("6.3.7", "#1", 2),
        ("6.12.117+deb12-amd64", "#1 SMP Debian 6.12.117-1", 2),
        ("6.18.44-fc-v1252", "#1 SMP PREEMPT_DYNAMIC @0", 2),
    ],
)
def test_the_verdict_cuts_repeated_bytes_only_where_that_is_safe(release, build, mode):
    assert seq_check(release, build) == mode
