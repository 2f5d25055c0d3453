"""[S] The pin instance name is a valid bpffs name whatever the state dir
is called (the bpffs refuses a name with a dot), and unchanged for every
state dir whose name it already accepted (existing installs keep their pins)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from meshagent.bpf.pins import NAME_MAX, instance_name


def today(path: Path) -> str:
    """The name before [S]: what an existing install's pins are called."""
    full = str(path.resolve())
    return f"{path.name or 'root'}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"


@pytest.mark.parametrize(
    "path", ["/run/meshagent", "/var/lib/mesh-agent_2", "/tmp/meshtest-abc123-xyz", "/", "/a b+c"]
)
def test_a_name_the_bpffs_accepts_is_kept_as_it_was(path):
    assert instance_name(Path(path)) == today(Path(path))


@pytest.mark.parametrize(
    "path", ["/tmp/x.Ab3d", "/run/meshagent.test", "/srv/..hidden.", "/a/b.c.d"]
)
def test_a_dot_never_reaches_the_bpffs(path):
    name = instance_name(Path(path))
    assert "." not in name and "/" not in name and name
    assert name.endswith(today(Path(path))[-9:])  # the full path's hash: still unique


def test_names_that_differ_only_by_a_dot_stay_apart():
    assert instance_name(Path("/run/mesh.a")) != instance_name(Path("/run/mesh_a"))


def test_a_long_name_fits_the_bpffs():
    long = Path("/tmp") / ("m" * 255)
    name = instance_name(long)
    assert len(name.encode()) <= NAME_MAX and name.endswith(today(long)[-9:])
    assert len(instance_name(Path("/tmp") / ("é" * 127)).encode()) <= NAME_MAX
