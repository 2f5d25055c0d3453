"""Pod runtimes: how a pod is found and named.

`standalone` is the runtime of a node without Kubernetes (a named network
namespace per pod, on a node bridge); a `cni` runtime for Kubernetes nodes
comes later and yields the same Pod records.
"""

from meshagent.pods.model import NodeConfig, Pod, validate_name

__all__ = ["NodeConfig", "Pod", "validate_name"]
