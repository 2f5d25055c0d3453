"""kube/cluster's pure parts: names, and where the node's layers go."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "kube" / "cluster"


@pytest.fixture
def cluster_module():
    loader = importlib.machinery.SourceFileLoader("kube_cluster", str(SCRIPT))
    spec = importlib.util.spec_from_loader("kube_cluster", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_layers_never_lie_under_what_the_node_mounts_over(cluster_module, monkeypatch):
    """The node overlays /etc, /opt and /var and mounts a tmpfs on /run: a
    checkout under one of them keeps its layers in the temp dir (an overlay
    whose upper dir lies inside its lower one is refused)."""
    monkeypatch.setattr(cluster_module, "CLUSTERS", Path("/work/x/kube/.cache/clusters"))
    assert cluster_module.Cluster("n1").layers == Path("/work/x/kube/.cache/clusters/n1/layers")
    for top in ("/var/lib/ci", "/opt/src", "/etc/x", "/run/y"):
        monkeypatch.setattr(cluster_module, "CLUSTERS", Path(top) / "clusters")
        layers = cluster_module.Cluster("n1").layers
        assert layers == Path(tempfile.gettempdir()) / "meshagent-kube-n1"


@pytest.mark.parametrize("name", ["", "1abc", "a_b", "toolongname1", "a b"])
def test_bad_names_are_one_line_errors(cluster_module, name):
    with pytest.raises(cluster_module.Failure, match="bad name"):
        cluster_module.Cluster(name)
