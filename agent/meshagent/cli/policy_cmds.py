"""`meshagent policy`: the running agent's authorization policy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meshagent.cli.app import App
from meshagent.cli.options import output_option

POLICY_EPILOG = """\b
Examples:
  meshagent policy apply policy.yaml
  meshagent policy show
  meshagent policy check web 10.244.1.5:5432
  meshagent policy check db 10.244.0.2:5432 --from spiffe://mesh.example/node/node-a/pod/web
"""


@click.group(epilog=POLICY_EPILOG)
def policy() -> None:
    """Who may connect where (docs/policy.md): AuthorizationPolicy documents.

    Outbound rules are decided in the connect hook (the application's
    connect() fails with EPERM), inbound ones where the connection arrives.
    """


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@output_option("the policy now in force (version, policies, rules)")
@click.pass_obj
def apply(app: App, file: Path, output: str) -> None:
    """Put FILE's policies in force, whole, for new connections.

    A file with an error is refused (its line named) and the rules in
    force stay; connections already open are kept either way.
    """
    from meshagent.client import request
    from meshagent.errors import MeshError
    from meshagent.policy.model import parse_text

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshError(f"policy file {file}: {getattr(exc, 'strerror', None) or exc}") from None
    parse_text(text, str(file))  # refused here first, with its line
    # The agent reads the file itself (a rule set may be larger than a request).
    reply = request(app.socket_path, "policy", action="apply", path=str(file.resolve()))
    reply.pop("ok", None)
    if output == "json":
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(f"policy version {reply['version']} in force: {len(reply['policies'])} policies,"
               f" {reply['rules']} rules ({reply['source']})")  # fmt: skip


@policy.command()
@output_option("the policy in force and its rules' ids")
@click.pass_obj
def show(app: App, output: str) -> None:
    """The policy in force: where it came from, its policies and rules."""
    from meshagent.client import request

    reply = request(app.socket_path, "policy", action="show")
    reply.pop("ok", None)
    if output == "json":
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(f"policy version {reply['version']} from {reply['source']}:"
               f" {len(reply['policies'])} policies, {reply['rules']} rules;"
               f" {reply['refused']} refused since the agent started")  # fmt: skip
    for rule in reply["rule_ids"]:
        click.echo(f"  {rule}")


@policy.command()
@click.argument("pod")
@click.argument("destination", metavar="IP:PORT")
@click.option("--from", "source", metavar="SPIFFE_ID",
              help="Check POD's inbound rules instead: a connection from this workload "
              "(at IP) to POD's PORT.")  # fmt: skip
@output_option("the verdict and the rule that decided")
@click.pass_obj
def check(app: App, pod: str, destination: str, source: str | None, output: str) -> None:
    """Would POD's connection to IP:PORT be allowed, and by which rule?"""
    from meshagent.client import request
    from meshagent.errors import MeshError

    host, _, port_text = destination.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MeshError(f"{destination!r}: give IP:PORT (e.g. 10.244.1.5:5432 or [fd00::5]:80)")
    port = int(port_text)
    args = {"from": source} if source is not None else {}
    reply = request(app.socket_path, "policy", action="check", pod=pod, ip=host, port=port,
                    **args)  # fmt: skip
    reply.pop("ok", None)
    if output == "json":
        click.echo(json.dumps(reply, indent=2))
        return
    how = reply["rule"] or "no policy governs it"
    arrow = f"{reply['from']} ({host}) -> {pod}:{port}" if source else f"{pod} -> {destination}"
    click.echo(f"{reply['verdict']}: {arrow} [{reply['direction']}: {how}]")


def register(cli: click.Group) -> None:
    cli.add_command(policy)
