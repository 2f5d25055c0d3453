"""meshagent trace: the kernel's decisions and the forwarder's, live."""

from __future__ import annotations

import click

from meshagent.cli.app import App
from meshagent.cli.options import output_option

TRACE_EPILOG = """\b
Examples:
  meshagent trace                          # every connect in the attached cgroup
  meshagent trace --pod client --port 80   # filtered in the kernel
  meshagent trace --dst 10.96.0.0/12 -o json
\b
Caveats: one trace at a time; events a slow reader misses are dropped, never
waited for; pid and comm need a kernel that lets sock_addr programs see the
calling task (probe-kernel: current_task_sock_addr).
"""


@click.command(epilog=TRACE_EPILOG)
@click.option("--pod", help="Only this pod (filtered in the kernel).")
@click.option("--port", type=click.IntRange(1, 65535), help="Only this destination port.")
@click.option("--dst", metavar="CIDR", help="Only destinations in this network.")
@output_option("one object a line, each event as it comes")
@click.option("--seconds", type=float, default=0, hidden=True, help="Stop after this long.")
@click.pass_obj
def trace(
    app: App, pod: str | None, port: int | None, dst: str | None, output: str, seconds: float
) -> None:
    """Show, live, where each connection of the attached pods went and why:
    steered or passed (with the reason) in the kernel, then forwarded, closed
    or reset (bytes each way, duration) in the forwarder. Ctrl-C ends it."""
    import ipaddress

    from meshagent import trace as tracer
    from meshagent.errors import MeshError

    if dst:
        try:
            ipaddress.ip_network(dst, strict=False)
        except ValueError as exc:
            raise MeshError(f"--dst {dst!r}: {exc}") from None
    tracer.run(app.socket_path, lambda line: click.echo(line), pod, port or 0, dst,
               output == "json", seconds)  # fmt: skip


def register(cli: click.Group) -> None:
    cli.add_command(trace)
