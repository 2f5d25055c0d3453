"""meshagent demo: the whole story in under 30 seconds."""

from __future__ import annotations

import click

from meshagent.cli.app import App, require_root


@click.command(epilog="\b\nExamples:\n  meshagent demo\n  meshagent demo --nodes 2")
@click.option("--nodes", type=click.IntRange(1, 2), default=1,
              help="2: two nodes of a mesh on this machine, mutual TLS between them.")  # fmt: skip
@click.pass_obj
def demo(app: App, nodes: int) -> None:
    """Two pods, a real HTTP server, an agent, curl steered through it, then
    everything removed again. With --nodes 2: two nodes, each with its own
    agent, and the connection between them in mutual TLS."""
    require_root("meshagent demo")
    if nodes == 2:
        from meshagent.demo_mesh import run_mesh_demo

        run_mesh_demo(click.echo)
        return
    from meshagent.demo import run_demo

    run_demo(app.state_dir, click.echo)


def register(cli: click.Group) -> None:
    cli.add_command(demo)
