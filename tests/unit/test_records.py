"""Pod records are not trusted as stored ([F] 7): a record naming another
netns, cgroup, veth or network is refused, reported by `pod list`, and
blocks new pods (so an address is never handed out twice)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from meshagent.cli import register_all
from meshagent.errors import MeshError
from meshagent.pods.model import NodeConfig, Pod, host_veth_name
from meshagent.pods.store import PodStore


def good(name: str = "web", node: NodeConfig | None = None) -> Pod:
    node = node or NodeConfig()
    netns = node.netns_prefix + name
    return Pod(name, netns, "10.244.0.5", "fd6d:6573:6800::5", host_veth_name(netns),
               f"{node.cgroup_parent}/{name}", node.bridge)  # fmt: skip


@pytest.fixture
def store(tmp_path):
    tmp_path.chmod(0o700)
    store = PodStore(tmp_path)
    store.pods_dir.mkdir()
    store.save_node(NodeConfig(), {"bridge": True, "cgroups": []})
    return store


@pytest.mark.parametrize(
    "field,value",
    [
        ("netns", "../../proc/1/ns/net"),
        ("netns", "mesh-other"),
        ("cgroup", "/"),
        ("cgroup", "system.slice"),
        ("host_veth", "eth0"),
        ("bridge", "docker0"),
        ("ip4", "192.0.2.1"),
        ("ip6", "not an address"),
    ],
)
def test_a_record_that_names_what_is_not_its_own_is_refused(store, field, value):
    store.save(good())
    assert store.get("web") == good()
    record = good().to_dict() | {field: value}
    (store.pods_dir / "web.json").write_text(json.dumps(record))
    with pytest.raises(MeshError, match="pod web: its record"):
        store.get("web")
    pods, problems = store.scan()
    assert pods == [] and len(problems) == 1 and "pod web" in problems[0]


def test_pod_list_reports_a_corrupt_record_and_fails(store):
    store.save(good("ok"))
    (store.pods_dir / "bad.json").write_text('{"name": "bad", "netns"')
    result = CliRunner().invoke(
        register_all(), ["--state-dir", str(store.state_dir), "pod", "list"]
    )
    assert result.exit_code == 1
    assert "ok" in result.stdout
    assert "pod bad: its record" in result.stderr and "unreadable" in result.stderr


def test_a_record_under_another_name_is_refused(store):
    (store.pods_dir / "web.json").write_text(json.dumps(good("api").to_dict()))
    with pytest.raises(MeshError, match="names pod 'api'"):
        store.get("web")


def test_a_state_dir_others_can_write_is_refused(store):
    store.state_dir.chmod(0o777)
    with pytest.raises(MeshError, match="only its owner"), store.locked():
        pass
    store.state_dir.chmod(0o700)
