"""Every choice a person can make, as one enum each: the CLI's choices,
the config's validation and the plan all read them from here."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """How an attached pod's connects reach its forwarder."""

    EBPF = "ebpf"  # cgroup connect hooks, one map entry per pod
    IPTABLES = "iptables"  # nat OUTPUT REDIRECT rules inside the pod's netns


class PodMode(StrEnum):
    """What the forwarder does for an attached pod's connections."""

    FORWARD = "forward"  # every connection through the forwarder (the extension point)
    KERNEL = "kernel"  # direct, the kernel decides and accounts; forwarded only where needed


class Redirect(StrEnum):
    """`--redirect`: a backend, or auto (ebpf where the kernel has it)."""

    AUTO = "auto"
    EBPF = "ebpf"
    IPTABLES = "iptables"


class DataPathMode(StrEnum):
    """How bytes move once a connection is forwarded; in the order auto prefers."""

    SOCKMAP = "sockmap"  # the kernel splices the two sockets (sk_skb verdict)
    SPLICE = "splice"  # splice(2) through a pipe per direction
    COPY = "copy"  # a userspace copy loop


class DataPathChoice(StrEnum):
    """`--datapath`: a data path, or auto (self-tested at start)."""

    AUTO = "auto"
    SOCKMAP = "sockmap"
    SPLICE = "splice"
    COPY = "copy"


class IptablesFlavour(StrEnum):
    LEGACY = "legacy"
    NFT = "nft"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Output(StrEnum):
    """`-o` of every reporting command."""

    TEXT = "text"
    JSON = "json"


def values(enum: type[StrEnum]) -> list[str]:
    """The enum's values, for click.Choice and error messages."""
    return [member.value for member in enum]


def parse(enum: type[StrEnum], text: object, what: str) -> StrEnum:
    """text as a member of enum, or MeshError naming the choices."""
    from meshagent.errors import MeshError

    try:
        return enum(text)
    except ValueError:
        raise MeshError(f"{what} must be one of {', '.join(values(enum))}, not {text!r}") from None
