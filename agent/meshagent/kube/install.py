"""Put meshagent-cni on a node and chain it into the node's CNI config;
take both away again.

The runtime runs CNI plugins from the host's /opt/cni/bin, outside the
agent's container, so the plugin goes there as one file: a Python zipapp of
this package whose entry is cni/plugin.py, which needs only the standard
library (the host's python3, 3.9 or newer). The runtime reads the first
config file of /etc/cni/net.d in name order; meshagent-cni is appended to
its plugin list (a single-plugin .conf becomes a .conflist, as the runtime
would read it), and uninstall removes exactly that entry. Both are
idempotent and write files whole (a temp file, then rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipapp
from pathlib import Path

from meshagent.cni.plugin import ATTACH, EXCLUDE_NAMESPACES, WHEN_NO_AGENT
from meshagent.errors import MeshError

PLUGIN = "meshagent-cni"
CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


def node_config(conf_dir: Path) -> Path:
    """The config file the runtime uses: the first by name."""
    try:
        names = sorted(p for p in os.listdir(conf_dir) if p.endswith(CONFIG_SUFFIXES))
    except FileNotFoundError:
        raise MeshError(f"CNI config dir {conf_dir} does not exist") from None
    if not names:
        raise MeshError(f"no CNI config in {conf_dir}: install the node's network plugin first")
    return conf_dir / names[0]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MeshError(f"CNI config {path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise MeshError(f"CNI config {path}: not a JSON object")
    return data


def _write(path: Path, data: dict | bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(
                data if isinstance(data, bytes) else (json.dumps(data, indent=2) + "\n").encode()
            )
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plugin_entry(state_dir: Path, attach: str, exclude: list[str],
                 when_no_agent: str = WHEN_NO_AGENT[0]) -> dict:  # fmt: skip
    entry = {"type": PLUGIN, "stateDir": str(state_dir), "attach": attach,
             "excludeNamespaces": exclude}  # fmt: skip
    if when_no_agent != WHEN_NO_AGENT[0]:
        entry["whenNoAgent"] = when_no_agent
    return entry


def chained(data: dict, entry: dict, path: Path) -> dict:
    """The config with meshagent-cni last in its plugin list (once)."""
    if "plugins" in data:
        plugins = data["plugins"]
        if not isinstance(plugins, list):
            raise MeshError(f"CNI config {path}: 'plugins' is not a list")
        out = dict(data)
    else:  # a single-plugin .conf
        if "type" not in data:
            raise MeshError(f"CNI config {path}: neither 'plugins' nor 'type'")
        single = {k: v for k, v in data.items() if k not in ("cniVersion", "name")}
        out = {
            "cniVersion": data.get("cniVersion", "1.0.0"),
            "name": data.get("name", "k8s-pod-network"),
        }
        plugins = [single]
    plugins = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN)]
    out["plugins"] = [*plugins, entry]
    return out


def unchained(data: dict) -> dict:
    plugins = data.get("plugins")
    if not isinstance(plugins, list):
        return data
    return {**data, "plugins": [p for p in plugins
                                if not (isinstance(p, dict) and p.get("type") == PLUGIN)]}  # fmt: skip


def build_plugin(target: Path) -> None:
    """Write the plugin (a zipapp of this package) to target."""
    package = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "app"
        shutil.copytree(package, stage / "meshagent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        (stage / "__main__.py").write_text("from meshagent.cni.plugin import main\n\nmain()\n")
        archive = Path(tmp) / PLUGIN
        zipapp.create_archive(stage, archive, interpreter="/usr/bin/env python3")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, archive.read_bytes(), 0o755)


def install(bin_dir: Path, conf_dir: Path, state_dir: Path, attach: str = ATTACH[0],
            exclude: list[str] | None = None,
            when_no_agent: str = WHEN_NO_AGENT[0]) -> dict:  # fmt: skip
    """Place the plugin and chain it; returns what was done."""
    path = node_config(conf_dir)
    data = _read(path)
    if exclude is None:
        exclude = list(EXCLUDE_NAMESPACES)
    entry = plugin_entry(state_dir, attach, exclude, when_no_agent)
    new = chained(data, entry, path)
    build_plugin(bin_dir / PLUGIN)
    target = path
    if path.suffix != ".conflist" and "plugins" not in data:
        target = path.with_suffix(".conflist")
    _write(target, new)
    if target != path:
        path.unlink()
    return {"plugin": str(bin_dir / PLUGIN), "config": str(target)}


def uninstall(bin_dir: Path, conf_dir: Path) -> dict:
    removed = []
    try:
        names = sorted(p for p in os.listdir(conf_dir) if p.endswith(CONFIG_SUFFIXES))
    except FileNotFoundError:
        names = []
    for name in names:
        path = conf_dir / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and unchained(data) != data:
            _write(path, unchained(data))
            removed.append(str(path))
    plugin = bin_dir / PLUGIN
    had = plugin.exists()
    plugin.unlink(missing_ok=True)
    return {"configs": removed, "plugin_removed": had}
