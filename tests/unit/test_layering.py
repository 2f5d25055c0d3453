"""The package's shape, checked from its source: no import cycle, the control
transport known only to the agent's wiring, backends and replies used
through their declared interfaces, and the attached-pod record read back
as it was written (also in the form agents before it wrote)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from meshagent.errors import MeshError
from meshagent.state import PodRecord, StateDir

PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "meshagent"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def _imported(node: ast.AST, modules: dict) -> set[str]:
    """The package's modules an import statement names."""
    names = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n in modules}


def _dependencies(tree: ast.Module, modules: dict) -> set[str]:
    """Every module of the package this one imports, at its top or inside a
    function (a deferred import is still a dependency); TYPE_CHECKING aside."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for inner in ast.walk(node):
            found |= _imported(inner, modules)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _dependencies(tree, modules) - {name} for name, tree in modules.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if dep.startswith(name + "."):  # a package importing its own submodule
                continue
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_agent_wiring_imports_the_control_server():
    modules = _modules()
    importers = sorted(
        name
        for name, tree in modules.items()
        if name != "meshagent.control"
        and any("meshagent.control" in _imported(node, modules) for node in ast.walk(tree))
    )
    assert importers == ["meshagent.agent"]


@pytest.mark.parametrize("text", ["getattr(backend", "hasattr(backend", '"_fds"', '"_on_close"'])
def test_no_duck_typing_of_backends_or_replies(text):
    hits = [
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if text in path.read_text()
    ]
    assert hits == []


def test_a_pod_record_reads_back_as_written(tmp_path):
    record = PodRecord("web", "iptables", "mesh-web", "4:4026532300", 1700000000.5,
                       source="standalone", auto=True, flavour="nft")  # fmt: skip
    state = StateDir(tmp_path)
    state.write_attached([record])
    assert state.read_attached() == {"web": record}
    on_disk = json.loads(state.attached_file.read_text())["pods"]["web"]
    assert "name" not in on_disk and "attaching" not in on_disk


def test_a_record_written_before_the_pod_record_type_is_read():
    old = {"backend": "ebpf", "netns": "mesh-a", "netns_id": "4:1", "since": 1.0,
           "draining": False, "source": "standalone", "auto": False}  # fmt: skip
    record = PodRecord.from_dict("a", old)
    assert (record.backend, record.netns_id, record.flavour) == ("ebpf", "4:1", None)


@pytest.mark.parametrize("bad", [{"netns": "x", "netns_id": "1:2"}, {"backend": 3, "netns": "x",
                                 "netns_id": "1:2"}])  # fmt: skip
def test_a_malformed_record_is_refused_in_one_line(bad, tmp_path):
    with pytest.raises(MeshError, match="pod p: its attachment record"):
        PodRecord.from_dict("p", bad)
    state = StateDir(tmp_path)
    state.attached_file.write_text(json.dumps({"pods": {"p": bad}}))
    assert state.read_attached() == {}  # ignored with a warning, never a crash


def test_the_state_dir_lock_is_one_agent_at_a_time(tmp_path):
    import os

    state = StateDir(tmp_path)
    fd = state.lock()
    try:
        with pytest.raises(MeshError, match="another agent runs with state dir"):
            state.lock()
    finally:
        os.close(fd)
    os.close(state.lock())  # free again
