"""State files (attached.json, node.json, pods/*.json, cni/*.json) are the
owner's only: 0600 whatever the process umask."""

import os
import stat

import pytest

from meshagent.pods.kubelet import CniStore, new_record
from meshagent.state import PodRecord, StateDir, write_json


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_json_is_owner_only(tmp_path, open_umask):
    path = tmp_path / "node.json"
    write_json(path, {"a": 1})
    assert _mode(path) == 0o600


def test_leftover_tmp_does_not_widen_mode(tmp_path, open_umask):
    path = tmp_path / "node.json"
    leftover = path.with_suffix(".tmp")
    leftover.write_text("junk")
    os.chmod(leftover, 0o666)
    write_json(path, {"a": 1})
    assert _mode(path) == 0o600
    assert not leftover.exists()


def test_attached_json_is_owner_only(tmp_path, open_umask):
    state = StateDir(tmp_path)
    state.write_attached([PodRecord(name="p", backend="ebpf", netns="n", netns_id="1:2")])
    assert _mode(state.attached_file) == 0o600
    assert state.read_attached()["p"].netns == "n"


def test_cni_record_is_owner_only(tmp_path, open_umask):
    store = CniStore(tmp_path)
    record = new_record(
        namespace="ns",
        name="pod",
        uid="u",
        container_id="c",
        netns="/proc/1/ns/net",
        ifname="eth0",
        ips=[],
        attach=True,
    )
    store.save(record)
    assert _mode(store.path(record.full_name)) == 0o600
