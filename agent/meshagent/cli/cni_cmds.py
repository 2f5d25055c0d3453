"""meshagent cni install | uninstall: the chained CNI plugin on a node."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meshagent.cli.app import App, require_root
from meshagent.cli.options import output_option
from meshagent.cni.plugin import ATTACH, EXCLUDE_NAMESPACES, WHEN_NO_AGENT

INSTALL_EXAMPLES = """\
  meshagent cni install                       # /opt/cni/bin and /etc/cni/net.d
  meshagent cni install --attach all --exclude-namespaces kube-system,monitoring
  meshagent cni install --when-no-agent wait   # pods wait for the agent, never unmeshed
  meshagent cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d
"""
UNINSTALL_EXAMPLES = """\
  meshagent cni uninstall -o json
  meshagent cni uninstall --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d
"""

dir_type = click.Path(path_type=Path, file_okay=False)


@click.group(epilog=f"\b\nExamples:\n{INSTALL_EXAMPLES}{UNINSTALL_EXAMPLES}")
def cni() -> None:
    """The chained CNI plugin (meshagent-cni) on this node."""


def _dirs(fn):
    fn = click.option("--bin-dir", type=dir_type, default=Path("/opt/cni/bin"),
                      help="Where the runtime finds CNI plugins.")(fn)  # fmt: skip
    fn = click.option("--conf-dir", type=dir_type, default=Path("/etc/cni/net.d"),
                      help="The node's CNI configs.")(fn)  # fmt: skip
    return fn


@cni.command(epilog=f"\b\nExamples:\n{INSTALL_EXAMPLES}")
@_dirs
@output_option("the plugin's path and the config it was chained into")
@click.option(
    "--attach",
    type=click.Choice(ATTACH),
    default=ATTACH[0],
    help="labelled: the agent attaches pods labelled meshagent.io/attach=true (or in a"
    " namespace so labelled); all: every pod outside --exclude-namespaces.",
)
@click.option("--exclude-namespaces", default=",".join(EXCLUDE_NAMESPACES),
              help="Namespaces never attached with --attach all, and never kept waiting"
                   " by --when-no-agent wait (comma-separated).")  # fmt: skip
@click.option(
    "--when-no-agent",
    type=click.Choice(WHEN_NO_AGENT),
    default=WHEN_NO_AGENT[0],
    show_default=True,
    help="A pod that starts while no agent runs: start (unmeshed, direct until an agent"
    " runs) or wait (its sandbox is retried until an agent answers).",
)
@click.pass_obj
def install(app: App, bin_dir: Path, conf_dir: Path, output: str, attach: str,
            exclude_namespaces: str, when_no_agent: str) -> None:  # fmt: skip
    """Put meshagent-cni in BIN_DIR and chain it into the node's first config."""
    from meshagent.kube.install import install as do_install

    require_root("meshagent cni install")
    exclude = [n for n in exclude_namespaces.split(",") if n]
    done = do_install(bin_dir, conf_dir, app.state_dir, attach, exclude, when_no_agent)
    if output == "json":
        click.echo(json.dumps(done, indent=2))
    else:
        click.echo(f"meshagent-cni installed: {done['plugin']}, chained in {done['config']}")


@cni.command(epilog=f"\b\nExamples:\n{UNINSTALL_EXAMPLES}")
@_dirs
@output_option("the configs it was taken out of, and whether the plugin was there")
def uninstall(bin_dir: Path, conf_dir: Path, output: str) -> None:
    """Take meshagent-cni out of the node's configs and remove it."""
    from meshagent.kube.install import uninstall as do_uninstall

    require_root("meshagent cni uninstall")
    done = do_uninstall(bin_dir, conf_dir)
    if output == "json":
        click.echo(json.dumps(done, indent=2))
    else:
        configs = ", ".join(done["configs"]) or "no config named it"
        click.echo(f"meshagent-cni uninstalled ({configs})")


def register(cli: click.Group) -> None:
    cli.add_command(cni)
