"""meshagent pod create|delete|list|exec: the standalone pod runtime."""

from __future__ import annotations

import json

import click

from meshagent.cli.app import App, require_root
from meshagent.cli.options import output_option
from meshagent.errors import MeshError, NoAgent, NotAttached
from meshagent.pods.model import NodeConfig

POD_EPILOG = """\b
Examples:
  meshagent pod create web --ip 10.244.0.10
  meshagent pod exec web -- nginx -g 'daemon off;'
  meshagent pod list -o json
  meshagent pod delete web
"""


@click.group(epilog=POD_EPILOG)
def pod() -> None:
    """Standalone pods: a named netns on the node bridge, with a cgroup."""


@pod.command(epilog="\b\nExample:\n  meshagent pod create client --ip 10.244.0.5")
@click.argument("name")
@click.option("--ip", show_default="the lowest free", help="IPv4 address in the pod network.")
@click.option("--pod-cidr", "cidr4", envvar="MESHAGENT_POD_CIDR", default=NodeConfig.cidr4,
              help="Node IPv4 pod network (the node's first pod fixes it).")  # fmt: skip
@click.option("--pod-cidr6", "cidr6", envvar="MESHAGENT_POD_CIDR6", default=NodeConfig.cidr6,
              help="Node IPv6 ULA /64 (the node's first pod fixes it).")  # fmt: skip
@click.option("--bridge", envvar="MESHAGENT_BRIDGE", default=NodeConfig.bridge,
              help="Node bridge name.")  # fmt: skip
@click.option("--cgroup-parent", envvar="MESHAGENT_CGROUP_PARENT",
              default=NodeConfig.cgroup_parent,
              help="cgroup (under the v2 mount) that holds pod cgroups.")  # fmt: skip
@click.option("--netns-prefix", envvar="MESHAGENT_NETNS_PREFIX", default=NodeConfig.netns_prefix,
              help="Pod netns names.")  # fmt: skip
@click.option("--node-netns", envvar="MESHAGENT_NODE_NETNS", default=NodeConfig.node_netns,
              show_default="this one",
              help="The network namespace that holds the bridge (a node of a mesh on one"
              " machine).")  # fmt: skip
@click.option("--mtls", type=click.Choice(["permissive", "strict"]), default="permissive",
              help="strict: only the mesh's mutual-TLS hop (and the pod itself) may connect"
              " to it, also while no agent runs.")  # fmt: skip
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="A label policies select the pod by (docs/policy.md); again for more.",
)
@click.pass_context
def create(ctx: click.Context, name: str, ip: str | None, mtls: str, labels: tuple[str, ...],
           **node_options: str) -> None:  # fmt: skip
    """Create pod NAME: netns mesh-NAME, veth to the bridge, IPv4 + IPv6."""
    from click.core import ParameterSource

    from meshagent.pods.standalone import create_pod

    require_root("meshagent pod create")
    given = [ctx.get_parameter_source(o) is not ParameterSource.DEFAULT for o in node_options]
    # None: the node's own (node.json), else NodeConfig's defaults.
    node = NodeConfig(**node_options) if any(given) else None
    app: App = ctx.obj
    from meshagent.pods.model import parse_labels

    made = create_pod(app.store(), name, ip, node, mtls, parse_labels(labels))
    click.echo(f"pod {made.name} created: {made.ip4} {made.ip6} (netns {made.netns})")


@pod.command(epilog="\b\nExample:\n  meshagent pod delete client")
@click.argument("name")
@click.pass_obj
def delete(app: App, name: str) -> None:
    """Delete pod NAME (detaches it from a running agent first)."""
    from meshagent.client import request
    from meshagent.pods.standalone import delete_pod

    require_root("meshagent pod delete")
    app.store().get(name)
    if app.socket_path.exists():
        try:
            request(app.socket_path, "detach", pod=name)
        except (NoAgent, NotAttached):
            pass
        except MeshError as exc:
            click.echo(f"meshagent: warning: pod {name}: detach failed: {exc}", err=True)
    delete_pod(app.store(), name)
    click.echo(f"pod {name} deleted")


@pod.command(
    name="list", epilog="\b\nExamples:\n  meshagent pod list\n  meshagent pod list -o json"
)
@output_option("every pod's record")
@click.pass_obj
def list_(app: App, output: str) -> None:
    """List pods."""
    pods, problems = app.store().scan()
    for problem in problems:
        click.echo(f"meshagent: error: {problem}", err=True)
    if output == "json":
        click.echo(json.dumps([p.to_dict() for p in pods], indent=2))
    elif not pods:
        click.echo("no pods")
    else:
        click.echo(f"{'NAME':20} {'IPV4':15} {'IPV6':28} NETNS")
        for p in pods:
            click.echo(f"{p.name:20} {p.ip4:15} {p.ip6:28} {p.netns}")
    if problems:
        raise SystemExit(1)


@pod.command(
    name="exec",
    context_settings={"ignore_unknown_options": True},
    epilog="\b\nExamples:\n  meshagent pod exec client -- curl -s http://10.244.0.3/\n"
    "  meshagent pod exec server -- nginx -g 'daemon off;'",
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(app: App, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside pod NAME's netns and cgroup; exits with its status."""
    import sys

    from meshagent.pods.standalone import popen

    require_root("meshagent pod exec")
    proc = popen(app.store().get(name), command)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    sys.exit(code if code >= 0 else 128 - code)


def register(cli: click.Group) -> None:
    cli.add_command(pod)
