"""meshagent-cni's protocol (CNI spec 1.0.0), without a runtime: bad input
gets the spec's error JSON and codes, and nothing is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from meshagent.client import request
from meshagent.cni.plugin import run
from meshagent.errors import MeshError, NoAgent
from meshagent.kube.autoattach import opted_in
from meshagent.kube.install import chained, install, node_config, unchained, uninstall
from meshagent.pods.kubelet import CniStore, cgroup_of_uid, split_name

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
        "ips": [{"address": "10.1.0.5/24", "interface": 0}]}  # fmt: skip
ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=1234-ab"


def conf(tmp_path, **extra) -> bytes:
    data = {"cniVersion": "1.0.0", "name": "net", "type": "meshagent-cni",
            "stateDir": str(tmp_path / "state"), "prevResult": PREV, **extra}  # fmt: skip
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


def env(netns: str, **extra) -> dict:
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0", "CNI_ARGS": ARGS, **extra}  # fmt: skip


def error(out: str) -> dict:
    data = json.loads(out)
    assert set(data) >= {"cniVersion", "code", "msg"}
    return data


@pytest.fixture
def netns_file(tmp_path):
    path = tmp_path / "netns"  # stands in for the runtime's netns path
    path.write_text("")
    return str(path)


def test_add_records_the_pod_and_passes_prev_result_through(tmp_path, netns_file):
    code, out = run(env(netns_file), conf(tmp_path))
    assert code == 0
    assert json.loads(out) == PREV
    record = CniStore(tmp_path / "state").get("default/web")
    assert record.netns == netns_file and record.uid == "1234-ab" and record.ips == ["10.1.0.5"]
    assert record.attach is False  # "labelled" is the default


def test_attach_all_spares_excluded_namespaces(tmp_path, netns_file):
    run(env(netns_file), conf(tmp_path, attach="all"))
    assert CniStore(tmp_path / "state").get("default/web").attach is True
    system = ARGS.replace("default", "kube-system")
    run(env(netns_file, CNI_ARGS=system), conf(tmp_path, attach="all"))
    assert CniStore(tmp_path / "state").get("kube-system/web").attach is False


def test_old_config_versions_are_passed_through(tmp_path, netns_file):
    prev = {**PREV, "cniVersion": "0.4.0"}
    code, out = run(env(netns_file), conf(tmp_path, cniVersion="0.4.0", prevResult=prev))
    assert code == 0 and json.loads(out)["cniVersion"] == "0.4.0"


def test_del_is_idempotent_and_spares_a_newer_sandbox(tmp_path, netns_file):
    run(env(netns_file), conf(tmp_path))
    store = CniStore(tmp_path / "state")
    late = env("", CNI_COMMAND="DEL", CNI_CONTAINERID="older")
    assert run(late, conf(tmp_path)) == (0, "")
    assert store.get("default/web") is not None
    gone = env("", CNI_COMMAND="DEL")
    assert run(gone, conf(tmp_path)) == (0, "")
    assert store.get("default/web") is None
    assert run(gone, conf(tmp_path)) == (0, "")  # again: still success


def test_add_with_no_agent_behind_a_stale_socket_is_quiet(tmp_path, netns_file, capsys):
    """A socket file no agent listens on is "no agent" (NoAgent, told apart
    by its type): the record is kept for the next agent, nothing is printed."""
    state = tmp_path / "state"
    state.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(state / "agent.sock"))
    with pytest.raises(NoAgent):
        request(state / "agent.sock", "ping", timeout=1)
    code, out = run(env(netns_file), conf(tmp_path))
    assert code == 0 and json.loads(out) == PREV
    assert CniStore(state).get("default/web") is not None
    assert capsys.readouterr().err == ""


def test_check_compares_the_record_with_the_sandbox(tmp_path, netns_file):
    run(env(netns_file), conf(tmp_path))
    assert run(env(netns_file, CNI_COMMAND="CHECK"), conf(tmp_path)) == (0, "")
    code, out = run(env(netns_file, CNI_COMMAND="CHECK", CNI_CONTAINERID="other"), conf(tmp_path))
    assert code == 1 and error(out)["code"] == 3


def test_version():
    code, out = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    assert code == 0 and "1.0.0" in json.loads(out)["supportedVersions"]


@pytest.mark.parametrize(
    "change, stdin, code, words",
    [
        ({"CNI_COMMAND": "GC"}, None, 4, "unknown CNI_COMMAND"),
        ({"CNI_COMMAND": ""}, None, 4, "unknown CNI_COMMAND"),
        ({}, b"{not json", 6, "not JSON"),
        ({}, b"[1, 2]", 6, "JSON object"),
        ({}, b'{"name": "x"}', 7, "lacks cniVersion"),
        ({}, b'{"cniVersion": "9.9.9"}', 1, "not supported"),
        ({"CNI_CONTAINERID": ""}, None, 4, "CNI_CONTAINERID"),
        ({"CNI_NETNS": "/nonexistent/netns"}, None, 3, "does not exist"),
        ({"CNI_ARGS": "K8S_POD_NAMESPACE"}, None, 4, "KEY=VALUE"),
        ({"CNI_ARGS": "K8S_POD_NAMESPACE=Bad_NS;K8S_POD_NAME=x"}, None, 4, "DNS-1123"),
    ],
)
def test_bad_input_is_a_spec_error_and_writes_nothing(tmp_path, netns_file, change, stdin, code,
                                                      words):  # fmt: skip
    got, out = run(env(netns_file, **change), stdin if stdin is not None else conf(tmp_path))
    assert got == 1
    err = error(out)
    assert err["code"] == code and words in err["msg"], err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"prevResult": None}, "chained plugin"),
        ({"stateDir": "relative"}, "absolute path"),
        ({"attach": "some"}, "labelled"),
        ({"excludeNamespaces": "kube-system"}, "list"),
    ],
)
def test_bad_plugin_config_is_code_7(tmp_path, netns_file, extra, words):
    got, out = run(env(netns_file), conf(tmp_path, **extra))
    err = error(out)
    assert got == 1 and err["code"] == 7 and words in err["msg"]


def test_the_console_script_speaks_json_on_stdout_and_one_line_on_stderr(tmp_path):
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "meshagent-cni")],
                          input="{oops", capture_output=True, text=True,
                          env={"CNI_COMMAND": "ADD", "PATH": os.environ["PATH"]})  # fmt: skip
    assert proc.returncode == 1
    assert error(proc.stdout)["code"] == 6
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# -- install into a node's config ----------------------------------------------
def test_install_chains_once_and_uninstall_takes_exactly_that_out(tmp_path):
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    original = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"},
                                                                  {"type": "portmap"}]}  # fmt: skip
    (conf_dir / "10-k8s.conflist").write_text(json.dumps(original))
    (conf_dir / "20-other.conflist").write_text(json.dumps(original))
    for _ in range(2):
        done = install(bin_dir, conf_dir, tmp_path / "state", "all", ["kube-system"])
    data = json.loads((conf_dir / "10-k8s.conflist").read_text())
    assert [p["type"] for p in data["plugins"]] == ["bridge", "portmap", "meshagent-cni"]
    assert json.loads((conf_dir / "20-other.conflist").read_text()) == original
    assert os.access(done["plugin"], os.X_OK)
    version = subprocess.run([sys.executable, "-S", done["plugin"]], input='{"cniVersion":"1.0.0"}',
                             env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True)  # fmt: skip
    assert version.returncode == 0 and "supportedVersions" in version.stdout  # stdlib only

    uninstall(bin_dir, conf_dir)
    assert json.loads((conf_dir / "10-k8s.conflist").read_text()) == original
    assert not (bin_dir / "meshagent-cni").exists()
    assert uninstall(bin_dir, conf_dir) == {"configs": [], "plugin_removed": False}


def test_a_single_plugin_conf_becomes_a_conflist(tmp_path):
    single = {"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}
    out = chained(single, {"type": "meshagent-cni"}, tmp_path / "x.conf")
    assert out == {
        "cniVersion": "0.4.0",
        "name": "net",
        "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "meshagent-cni"}],
    }
    assert unchained(out)["plugins"] == [{"type": "bridge", "bridge": "cni0"}]


def test_install_refuses_a_node_without_config(tmp_path):
    with pytest.raises(MeshError, match="does not exist"):
        node_config(tmp_path / "missing")
    (tmp_path / "net.d").mkdir()
    with pytest.raises(MeshError, match="no CNI config"):
        install(tmp_path / "bin", tmp_path / "net.d", tmp_path / "state")
    (tmp_path / "net.d" / "10.conflist").write_text("{broken")
    with pytest.raises(MeshError, match="unreadable"):
        install(tmp_path / "bin", tmp_path / "net.d", tmp_path / "state")
    assert not (tmp_path / "bin").exists()


# -- names, labels, cgroup layout ---------------------------------------------
def test_pod_names_are_checked_as_the_api_server_would():
    assert split_name("default/web-1.a") == ("default", "web-1.a")
    for bad in ("web", "/web", "default/", "Default/web", "default/web_1", "a/b/c"):
        with pytest.raises(MeshError):
            split_name(bad)


def test_opt_in_pod_label_wins_over_the_namespace():
    label = "meshagent.io/attach"
    assert opted_in({label: "true"}, {})
    assert opted_in({}, {label: "true"})
    assert not opted_in({label: "false"}, {label: "true"})
    assert not opted_in({}, {})
    assert not opted_in({label: "yes"}, {})


def test_cgroup_layouts_of_both_drivers(tmp_path):
    uid = "0a1b2c3d-1111-2222-3333-444455556666"
    cgroupfs = tmp_path / "v2" / "kubepods" / "besteffort" / f"pod{uid}"
    cgroupfs.mkdir(parents=True)
    assert cgroup_of_uid(tmp_path / "v2", uid) == cgroupfs
    systemd = (tmp_path / "sd" / "kubepods.slice" / "kubepods-burstable.slice"
               / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice")  # fmt: skip
    systemd.mkdir(parents=True)
    assert cgroup_of_uid(tmp_path / "sd", uid) == systemd
    assert cgroup_of_uid(tmp_path / "sd", "not a uid!") is None
    assert cgroup_of_uid(tmp_path / "v2", "ffff") is None


# -- the plugin never stops a pod for its own bookkeeping ([S] item 5) ----------
LONG_NS, LONG_NAME = "n" * 63, ".".join(["p" * 63] * 3) + "." + "q" * 61  # 63 and 253 chars


def test_the_longest_valid_names_are_recorded_and_found(tmp_path, netns_file):
    """63 + 253 characters are valid names, too long together for
    NAMESPACE_NAME.json: the record gets a hashed file name, the full name
    inside; DEL and CHECK find it, all() lists it."""
    assert len(LONG_NS) == 63 and len(LONG_NAME) == 253
    args = f"K8S_POD_NAMESPACE={LONG_NS};K8S_POD_NAME={LONG_NAME};K8S_POD_UID=1234-ab"
    code, out = run(env(netns_file, CNI_ARGS=args), conf(tmp_path))
    assert code == 0 and json.loads(out) == PREV
    store, full = CniStore(tmp_path / "state"), f"{LONG_NS}/{LONG_NAME}"
    assert store.get(full).full_name == full
    assert [r.full_name for r in store.all()] == [full]
    assert len(store.path(full).name) <= 255
    assert run(env(netns_file, CNI_ARGS=args, CNI_COMMAND="CHECK"), conf(tmp_path)) == (0, "")
    assert run(env(netns_file, CNI_ARGS=args, CNI_COMMAND="DEL"), conf(tmp_path)) == (0, "")
    assert store.get(full) is None and store.all() == []


def test_short_names_keep_todays_file_name(tmp_path, netns_file):
    run(env(netns_file), conf(tmp_path))
    assert (tmp_path / "state" / "cni" / "default_web.json").exists()


@pytest.mark.parametrize("ips", [{"address": "10.1.0.5/24"}, "10.1.0.5", 5, [{"address": 7}, 3]])
def test_a_malformed_prev_result_ips_is_a_spec_error_or_ignored(tmp_path, netns_file, ips):
    """Not a list: the spec's code 7, never a traceback; bad entries in a
    list are skipped."""
    code, out = run(env(netns_file), conf(tmp_path, prevResult={**PREV, "ips": ips}))
    if isinstance(ips, list):
        assert code == 0 and CniStore(tmp_path / "state").get("default/web").ips == []
    else:
        assert code == 1 and error(out)["code"] == 7 and "ips" in error(out)["msg"]


def test_an_unwritable_record_dir_still_starts_the_pod(tmp_path, netns_file, capsys):
    """Record I/O failing is logged on stderr and ADD passes prevResult
    through: the pod starts (the agent finds it by its cgroup instead)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "cni").write_text("not a directory")  # fails for root too
    code, out = run(env(netns_file), conf(tmp_path))
    assert code == 0 and json.loads(out) == PREV
    assert "default/web" in capsys.readouterr().err
    assert run(env(netns_file, CNI_COMMAND="DEL"), conf(tmp_path)) == (0, "")


def test_a_record_dir_that_is_not_a_dir_is_a_check_error_not_a_traceback(tmp_path, netns_file):
    state = tmp_path / "state"
    state.mkdir()
    (state / "cni").write_text("not a directory")
    code, out = run(env(netns_file, CNI_COMMAND="CHECK"), conf(tmp_path))
    assert code == 1 and error(out)["code"] in (3, 5)


def test_when_no_agent_wait_keeps_a_pod_from_starting_until_an_agent_answers(tmp_path, netns_file):
    """whenNoAgent "wait": with no agent, ADD fails with 11 (try again later),
    so the runtime retries the sandbox; excluded namespaces start anyway;
    "start" (the default) starts the pod; anything else is a config error."""
    code, out = run(env(netns_file), conf(tmp_path, whenNoAgent="wait"))
    assert code != 0 and error(out)["code"] == 11 and "default/web" in error(out)["msg"]
    system = ARGS.replace("default", "kube-system")
    code, out = run(env(netns_file, CNI_ARGS=system), conf(tmp_path, whenNoAgent="wait"))
    assert code == 0 and json.loads(out) == PREV
    assert run(env(netns_file), conf(tmp_path, whenNoAgent="start"))[0] == 0
    code, out = run(env(netns_file), conf(tmp_path, whenNoAgent="never"))
    assert code != 0 and error(out)["code"] == 7


def test_install_writes_when_no_agent_only_when_not_the_default(tmp_path):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-k8s.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]})
    )
    install(tmp_path / "bin", conf_dir, tmp_path / "state")
    entry = json.loads((conf_dir / "10-k8s.conflist").read_text())["plugins"][-1]
    assert "whenNoAgent" not in entry
    install(tmp_path / "bin", conf_dir, tmp_path / "state", when_no_agent="wait")
    entry = json.loads((conf_dir / "10-k8s.conflist").read_text())["plugins"][-1]
    assert entry["whenNoAgent"] == "wait"
