"""meshagent probe-kernel: what this kernel offers and what the plan picks."""

from __future__ import annotations

import json

import click

from meshagent.cli.options import output_option, plan_options

PROBE_EPILOG = """\b
Examples:
  meshagent probe-kernel
  meshagent probe-kernel --without netns_cookie -o json
  meshagent probe-kernel --load            # also let the kernel's verifier judge each program
"""


@click.command(name="probe-kernel", epilog=PROBE_EPILOG)
@output_option("each feature, how it was found, and the plan")
@plan_options
@click.option(
    "--load",
    is_flag=True,
    help="Also compile and load (not attach) the programs: what the kernel refuses joins the plan.",
)
def probe_kernel(
    output: str, without: tuple[str, ...], iptables_flavour: str | None, redirect: str,
    datapath: str, load: bool, cache_dir, bpf_cflags_extra: tuple[str, ...],
) -> None:  # fmt: skip
    """What this kernel offers, how each fact was found, and what `run` would
    use: the same plan() that `meshagent run` follows."""
    from meshagent import kernel
    from meshagent.config import AgentConfig
    from meshagent.plan import plan

    cfg = AgentConfig(
        without=tuple(without), iptables=iptables_flavour, redirect=redirect, datapath=datapath,
        extra_cflags=tuple(bpf_cflags_extra), cache_dir=cache_dir,
    )  # fmt: skip
    probe = kernel.probe(cfg.without, cfg.iptables)
    if load:
        from meshagent.bpf.loader import refusals

        first = plan(probe, cfg)
        probe = probe.with_refused(refusals(cfg, first.programs, first.cflags))
    chosen = plan(probe, cfg)
    from meshagent.mesh.ktls import kernel_offers_tls

    offered, how = kernel_offers_tls()
    report = {**probe.to_dict(), "auto": chosen.to_dict(),
              "mesh_hop": {"kernel_tls": offered, "how": how}}  # fmt: skip
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"kernel {report['kernel']} ({probe.raw.get('how', '')})")
    for name, feature in report["features"].items():
        click.echo(f"  {name:24} {'yes' if feature['ok'] else 'no ':3}  {feature['how']}")
    for name, reason in probe.refused.items():
        click.echo(f"  refused: {name}: {reason}")
    click.echo(f"auto backend:  {chosen.backend or 'none'} ({chosen.backend_reason})")
    click.echo(f"auto datapath: {chosen.datapaths[0]} ({chosen.datapath_reason})")
    hop = "kernel TLS, spliced" if offered else "OpenSSL in the agent"
    click.echo(f"mesh hop:      {hop} ({how}; `run --mesh` self-tests OpenSSL's hand-over)")
    for note in chosen.notes:
        click.echo(f"note: {note}")
    if chosen.error:
        click.echo(f"error: {chosen.error}")


def register(cli: click.Group) -> None:
    cli.add_command(probe_kernel)
