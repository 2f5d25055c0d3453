"""The CLI without privileges: help with examples, no heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from meshagent.cli import register_all
from meshagent.config import AgentConfig, parse_size

cli = register_all()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["pod"],
        ["pod", "create"],
        ["run"],
        ["attach"],
        ["detach"],
        ["status"],
        ["demo"],
        ["datapath"],
        ["datapath", "set"],
        ["probe-kernel"],
        ["trace"],
        ["probe"],
        ["pod", "delete"],
        ["pod", "list"],
        ["pod", "exec"],
    ],
)
def test_help_has_examples(args):
    result = CliRunner().invoke(cli, [*args, "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "Example" in result.output


def test_help_imports_neither_bcc_nor_pyroute2():
    code = (
        "import sys\n"
        "from meshagent.cli import main\n"
        "sys.argv=['meshagent','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "bad=[m for m in ('bcc','pyroute2','scapy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dump_bpf_prints_the_exact_text_with_cflags():
    result = CliRunner().invoke(cli, ["run", "--dump-bpf", "--conns-max", "512"])
    assert result.exit_code == 0
    assert "-DMESH_CONNS_MAX=512" in result.output.splitlines()[0]
    assert "int mesh_connect4(" in result.output


def test_attach_without_agent_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), "attach", "client"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"meshagent: error: no agent at {tmp_path}/agent.sock: start one with `meshagent run`"
    ]


def test_the_agents_options_take_their_defaults_from_agent_config():
    fields = AgentConfig.__dataclass_fields__
    given = {p.name: p.default for p in cli.commands["run"].params if isinstance(p.default, (
        int, str, Path))}  # fmt: skip
    checked = {name: default for name, default in given.items() if name in fields}
    for name, default in checked.items():
        expected = getattr(AgentConfig, name)
        if name == "memory_max":  # a size as text: "auto" is None (from the cgroup)
            default = parse_size(default, "--memory-max")
        assert default == getattr(expected, "value", expected), name
    assert {"port", "conns_max", "metrics_addr", "datapath", "cache_dir", "sockmap_msg"} <= set(
        checked
    )
    assert cli.params[0].name == "state_dir" and cli.params[0].default == AgentConfig.state_dir


def test_each_option_shows_its_default_and_environment_variable_once():
    wide = {"terminal_width": 200, "max_content_width": 200}
    top = CliRunner().invoke(cli, ["--help"], catch_exceptions=False, **wide).output
    assert "[env var: MESHAGENT_STATE_DIR; default: /run/meshagent]" in top
    run = CliRunner().invoke(cli, ["run", "--help"], catch_exceptions=False, **wide).output
    assert "[env var: MESHAGENT_METRICS_ADDR; default: 127.0.0.1:15090]" in run
    assert "default: (the cgroup v2 root)" in run
    assert "(default" not in run.lower() and "Default:" not in run


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["run", "--bogus"], "meshagent: No such option '--bogus' (see meshagent run --help)"),
        (["bogus"], "meshagent: No such command 'bogus' (see meshagent --help)"),
        (["pod", "exec"], "meshagent: Missing argument 'NAME' (see meshagent pod exec --help)"),
        (["run", "--state-dir", "/x"], "meshagent: --state-dir goes before the command:"
         " meshagent --state-dir DIR run (see meshagent run --help)"),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_and_exit_status_2(args, line):
    result = CliRunner().invoke(cli, args, prog_name="meshagent", catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [line]


def test_no_arguments_still_show_the_help_with_the_exit_statuses():
    result = CliRunner().invoke(cli, [], prog_name="meshagent", catch_exceptions=False)
    assert "Usage: meshagent" in result.output and "Exit status" in result.output


def test_version_needs_no_installed_package(monkeypatch):
    """From a source tree (no package metadata) --version is one line."""
    import importlib.metadata

    import meshagent

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    result = CliRunner().invoke(cli, ["--version"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.output == f"meshagent, version {meshagent.__version__}\n"


def _options(command, path=("meshagent",)):
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            yield " ".join(path), param
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options(sub, (*path, name))


def test_every_option_says_what_it_does():
    lacking = [f"{where} {param.opts[-1]}" for where, param in _options(cli) if not param.help]
    assert not lacking


def test_each_cni_command_shows_its_own_examples():
    uninstall = CliRunner().invoke(cli, ["cni", "uninstall", "--help"]).output
    install = CliRunner().invoke(cli, ["cni", "install", "--help"]).output
    assert "cni uninstall" in uninstall and "cni install" not in uninstall
    assert "cni install" in install and "cni uninstall" not in install
