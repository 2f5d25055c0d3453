"""`meshagent ca`: the mesh CA of a standalone mesh, and node certificates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meshagent.cli.options import output_option

CA_EPILOG = """\b
Examples:
  meshagent ca init /etc/meshagent/ca --trust-domain mesh.example
  meshagent ca issue /etc/meshagent/ca node-a --out /etc/meshagent/certs
  meshagent ca show /etc/meshagent/certs
"""


@click.group(epilog=CA_EPILOG)
def ca() -> None:
    """The mesh CA (standalone): node certificates for mutual TLS between nodes.

    The CA key stays in the CA directory; each node gets its own key, its
    certificate (a SPIFFE ID, spiffe://DOMAIN/meshagent/node/NODE) and the
    CA's certificate. On Kubernetes the identity service issues them.
    """


@ca.command(epilog="\b\nExample:\n  meshagent ca init ./ca --trust-domain mesh.example")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trust-domain", required=True, help="The mesh's trust domain (SPIFFE).")
@click.option("--days", type=int, default=365, help="The CA certificate's life.")
def init(directory: Path, trust_domain: str, days: int) -> None:
    """Make a new CA in DIRECTORY (ca.key, ca.crt); never overwrites one."""
    from meshagent.mesh import ca as mesh_ca

    mesh_ca.init(directory, trust_domain, days)
    click.echo(f"CA for spiffe://{trust_domain} in {directory} (keep ca.key there, and only there)")


@ca.command(epilog="\b\nExample:\n  meshagent ca issue ./ca node-a --out ./certs-a --hours 24")
@click.argument("ca_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("node")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The node's certificate directory (node.key, node.crt, ca.crt).")  # fmt: skip
@click.option("--hours", type=float, default=24.0,
              help="The certificate's life: issue the next one before it ends.")  # fmt: skip
@output_option("the identity and when it ends")
def issue(ca_dir: Path, node: str, out: Path, hours: float, output: str) -> None:
    """Issue node NODE's key and certificate into --out (each file replaced
    whole: a running agent takes the new ones for new connections)."""
    from meshagent.mesh import ca as mesh_ca

    issued = mesh_ca.issue(ca_dir, node, out, hours)
    if output == "json":
        click.echo(json.dumps({"identity": issued.identity, "not_after": issued.not_after,
                               "directory": str(out)}))  # fmt: skip
    else:
        click.echo(f"{issued.identity} until {issued.not_after} in {out}")


@ca.command(epilog="\b\nExample:\n  meshagent ca show ./certs-a")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@output_option("the certificate's identity and validity")
def show(directory: Path, output: str) -> None:
    """What the node certificate in DIRECTORY says."""
    from meshagent.errors import MeshError
    from meshagent.mesh import ca as mesh_ca

    try:
        info = mesh_ca.describe(directory / mesh_ca.NODE_CERT)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise MeshError(f"{directory / mesh_ca.NODE_CERT}: {reason}") from None
    if output == "json":
        click.echo(json.dumps(info))
    else:
        click.echo(f"{info['identity']} from {info['not_before']} until {info['not_after']}")


def register(cli: click.Group) -> None:
    cli.add_command(ca)


@ca.command(epilog="\b\nExample (the Deployment of deploy/mesh.yaml):\n"
            "  meshagent ca serve --trust-domain cluster.local")  # fmt: skip
@click.option("--trust-domain", default="cluster.local", envvar="MESHAGENT_TRUST_DOMAIN",
              show_default=True, help="The mesh's trust domain (SPIFFE).")  # fmt: skip
@click.option("--namespace", envvar="POD_NAMESPACE", default="meshagent", show_default=True,
              help="Where the CA's Secret and ConfigMap live (its own namespace).")  # fmt: skip
@click.option("--agents", default="meshagent:meshagent", show_default=True,
              help="NAMESPACE:SERVICEACCOUNT of the node agents it signs for.")  # fmt: skip
@click.option("--hours", type=float, default=24.0, show_default=True,
              help="A node certificate's life; agents renew at half of it.")  # fmt: skip
@click.option("--port", type=int, default=15012, show_default=True,
              help="Where it listens (HTTPS, its own certificate from the CA).")  # fmt: skip
def serve(trust_domain: str, namespace: str, agents: str, hours: float, port: int) -> None:
    """The identity service on Kubernetes: signs each node agent's key for
    its own node, after a TokenReview of its pod-bound token."""
    from meshagent import log
    from meshagent.errors import MeshError
    from meshagent.mesh import kube_ca

    if agents.count(":") != 1 or not all(agents.split(":")):
        raise MeshError(f"--agents {agents!r}: NAMESPACE:SERVICEACCOUNT")
    if not 0 < hours <= 24 * 366:
        raise MeshError("--hours: more than 0, at most a year")
    log.setup("json")
    kube_ca.serve(namespace, trust_domain, agents, port, hours)
