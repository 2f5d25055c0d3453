"""Options that `run` and `probe-kernel` share, defined once: the plan
sees the same choices from both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from meshagent.config import AgentConfig
from meshagent.modes import DataPathChoice, IptablesFlavour, Output, Redirect, values

cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=AgentConfig.cache_dir,
    envvar="MESHAGENT_CACHE_DIR",
    help="Where compiled BPF objects are kept (one per kernel and flags).",
)


def output_option(json_is: str) -> Callable:
    """-o/--output of a reporting command; json_is: what its JSON holds."""
    return click.option(
        "-o",
        "--output",
        type=click.Choice(values(Output)),
        default=Output.TEXT.value,
        help=f"text for people, or json for scripts: {json_is}.",
    )


def plan_options(fn: Callable) -> Callable:
    """--redirect, --datapath, --iptables, --without and the hidden --bpf-cflag."""
    for option in reversed(
        (
            click.option(
                "--redirect",
                type=click.Choice(values(Redirect)),
                default=AgentConfig.redirect.value,
                help="How attached pods' connects are steered; auto: ebpf if the kernel has it.",
            ),
            click.option(
                "--datapath",
                type=click.Choice(values(DataPathChoice)),
                default=AgentConfig.datapath.value,
                help="How bytes move once forwarded: sockmap (spliced in the kernel), splice"
                " (splice(2) through a pipe) or copy (in userspace); auto self-tests them in"
                " that order and takes the first that works.",
            ),
            click.option(
                "--iptables",
                "iptables_flavour",
                type=click.Choice(values(IptablesFlavour)),
                show_default="whichever holds the host's rules, else the system's",
                help="iptables flavour.",
            ),
            click.option(
                "--without",
                multiple=True,
                metavar="FEATURE",
                help="Act as if the kernel lacked FEATURE (e.g. netns_cookie); see probe-kernel.",
            ),
            cache_dir_option,
            click.option(
                "--bpf-cflag",
                "bpf_cflags_extra",
                multiple=True,
                hidden=True,
                help="An extra -D flag for the BPF compile (tests make the kernel refuse a"
                " program with -DMESH_TEST_REFUSE=1).",
            ),
        )
    ):
        fn = option(fn)
    return fn
