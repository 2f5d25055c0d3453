"""Kubernetes: the API watch (watch.py), which pods to attach (pods.py),
and the CNI plugin's install into a node's conflist (install.py)."""
