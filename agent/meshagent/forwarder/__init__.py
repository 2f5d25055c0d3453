"""The forwarder: per-pod listeners, original destination, upstream connect,
then a data path (this release: the userspace copy relay)."""

from meshagent.forwarder.core import Forwarder
from meshagent.forwarder.records import PodStats

__all__ = ["Forwarder", "PodStats"]
