"""The CLI without privileges: help with examples, no heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshagent.cli import register_all
from meshagent.config import AgentConfig

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
