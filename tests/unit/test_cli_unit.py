"""The CLI without privileges: help with examples, no heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from meshagent.cli import register_all

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
