"""meshagent demo: the whole story in under 30 seconds."""

from __future__ import annotations

import click

from meshagent.cli.app import App, require_root


@click.command(epilog="\b\nExample:\n  meshagent demo")
@click.pass_obj
def demo(app: App) -> None:
    """Two pods, a real HTTP server, an agent, curl steered through it, then
    everything removed again."""
    from meshagent.demo import run_demo

    require_root("meshagent demo")
    run_demo(app.state_dir, click.echo)


def register(cli: click.Group) -> None:
    cli.add_command(demo)
