"""meshagent probe: where does this pod's connection actually go?"""

from __future__ import annotations

import json

import click

from meshagent.cli.app import App, require_root
from meshagent.cli.options import output_option

PROBE_EPILOG = """\b
Examples:
  meshagent probe client 10.244.0.3:80
  meshagent probe client [fd6d:6573:6800::3]:80 -o json
  meshagent probe client 10.244.0.3:81 --syn      # one crafted SYN: SYN-ACK, RST or nothing
"""


@click.command(epilog=PROBE_EPILOG)
@click.argument("pod")
@click.argument("target", metavar="DEST:PORT")
@click.option("--syn", is_flag=True, help="Send one crafted SYN (scapy) instead of connecting.")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=3.0,
              help="Seconds to wait for the connect (with --syn: for the answer).")  # fmt: skip
@output_option("the packets, the kernel's decision and the verdict")
@click.pass_obj
def probe(app: App, pod: str, target: str, syn: bool, timeout: float, output: str) -> None:
    """Make one connection from inside POD to DEST:PORT while capturing on
    the pod's interfaces (lo included), and show the hops it took: to the
    pod's forwarder (steered) or straight out, the forwarder's upstream SYN
    with the pod's own address, and the kernel's decision for that socket.
    Works on pods that are not attached too."""
    from meshagent import conn_probe as prober

    require_root("meshagent probe")
    result = prober.run(app.state_dir, pod, target, syn, timeout)
    if output == "json":
        click.echo(json.dumps(result, indent=2))
    else:
        prober.show(result, click.echo)


def register(cli: click.Group) -> None:
    cli.add_command(probe)
