"""meshagent: a kernel-accelerated transparent proxy agent for pod traffic."""

__version__ = "0.1.0"
