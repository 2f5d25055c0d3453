"""Property: no command line crashes the CLI; every error is one line."""

from __future__ import annotations

import tempfile

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent.cli import register_all

# Commands that only read, or talk to an agent (none runs at the temporary
# state dir): safe to throw anything at, as root or not.
COMMANDS = [["status"], ["attach"], ["detach"], ["datapath"], ["datapath", "set"], ["trace"],
            ["pod", "list"], ["pod", "delete"], ["pod", "exec"]]  # fmt: skip
TOKENS = st.lists(
    st.text(min_size=1, max_size=12).filter(lambda s: s.strip() and "\x00" not in s)
    | st.sampled_from(
        [
            "-o",
            "json",
            "--pod",
            "--port",
            "0",
            "70000",
            "--dst",
            "x/99",
            "--",
            "client",
            "--redirect",
            "warp",
            "-h",
        ]
    ),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(COMMANDS), TOKENS)
def test_any_arguments_exit_cleanly(command, tokens):
    with tempfile.TemporaryDirectory() as state:
        result = CliRunner().invoke(
            register_all(), ["--state-dir", state, *command, *tokens], catch_exceptions=False
        )
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 1:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("meshagent: error:"), result.stderr
    if result.exit_code == 2:  # a usage error: one line too, naming the help to read
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("meshagent: "), result.stderr
        assert result.stderr.rstrip().endswith(" --help)"), result.stderr
