"""Host primitives the rest builds on: network namespaces, cgroup v2 and
the event loop."""
