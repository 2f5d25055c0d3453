"""The chained CNI plugin (`meshagent-cni`) and its install into a node's conflist."""
