"""meshagent's command line. One module per command group; heavy imports
(bcc, pyroute2) happen inside the commands that need them."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from meshagent import __version__
from meshagent.cli.app import App
from meshagent.config import AgentConfig
from meshagent.errors import MeshError

# click >= 8.2 shows a group's help for no arguments by raising this usage error.
NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())

EPILOG = """\b
Examples:
  meshagent pod create client && meshagent pod create server
  meshagent run --cgroup /sys/fs/cgroup/unified/mytest &   # foreground agent
  meshagent attach client
  meshagent pod exec client -- curl -s http://10.244.0.3/
  meshagent status -o json
  meshagent detach client
  meshagent demo                                          # all of the above
\b
Exit status (an error is one line on stderr):
  0    success
  1    an error: meshagent: error: WHAT
  2    a usage error: meshagent: WHAT (see meshagent CMD --help)
  130  interrupted (Ctrl-C)
  `pod exec` exits with its command's status.
"""


def usage_error(exc: click.UsageError) -> None:
    """A usage error as one line on stderr (not click's three), exit status 2."""
    where = exc.ctx.command_path if exc.ctx else "meshagent"
    message = exc.format_message().rstrip(".")
    if isinstance(exc, click.NoSuchOption) and exc.option_name == "--state-dir":
        command = where.partition(" ")[2]
        message = f"--state-dir goes before the command: meshagent --state-dir DIR {command}"
    line = "".join(repr(c)[1:-1] if not c.isprintable() else c for c in message)
    click.echo(f"meshagent: {line} (see {where} --help)", err=True)
    sys.exit(exc.exit_code)


class MeshGroup(click.Group):
    """Every MeshError becomes one line on stderr and exit status 1; a usage
    error, one line and exit status 2."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if isinstance(exc, NO_ARGS):
                raise
            usage_error(exc)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if isinstance(exc, NO_ARGS):
                raise
            usage_error(exc)
        except MeshError as exc:
            click.echo(f"meshagent: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("meshagent: interrupted", err=True)
            sys.exit(130)


# Every option shows its default (AgentConfig's, for the agent's options) and
# its environment variable the same way: [env var: ...; default: ...].
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(cls=MeshGroup, epilog=EPILOG, context_settings=CONTEXT)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False, readable=False),
    default=AgentConfig.state_dir,
    envvar="MESHAGENT_STATE_DIR",
    help="Where pod records and the agent's socket live.",
)
@click.version_option(__version__, prog_name="meshagent")  # no lookup: a source tree has none
@click.pass_context
def cli(ctx: click.Context, state_dir: Path) -> None:
    """meshagent: kernel-accelerated transparent proxy agent for pod traffic.

    Steers the outbound TCP connections of attached pods, with no change to
    the applications, to a per-pod forwarder listener, using cgroup eBPF
    hooks; the forwarder connects upstream from inside the pod.
    """
    ctx.obj = App(state_dir=state_dir)


def register_all() -> click.Group:
    """Every command group on `cli` (the modules import only click)."""
    from meshagent.cli import (
        agent_cmds,
        ca_cmds,
        cni_cmds,
        demo_cmds,
        kernel_cmds,
        pod_cmds,
        policy_cmds,
        probe_cmds,
        trace_cmds,
    )  # fmt: skip

    for module in (pod_cmds, agent_cmds, cni_cmds, kernel_cmds, trace_cmds, probe_cmds,
                   demo_cmds, ca_cmds, policy_cmds):  # fmt: skip
        module.register(cli)
    _show_envvars(cli)
    return cli


def _show_envvars(command: click.Command) -> None:
    """Each option that reads an environment variable says which."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            param.show_envvar = True
    for sub in getattr(command, "commands", {}).values():
        _show_envvars(sub)


def main() -> None:
    register_all()(prog_name="meshagent")
