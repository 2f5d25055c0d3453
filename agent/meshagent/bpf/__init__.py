"""The BPF side: `programs` (what each program needs), `features` (what the
kernel has), `abi` (names and struct layouts shared with the C), `syscall`
(raw bpf(2), no libbcc), `source` (the C text BCC compiles), `objects`
(compiled, cached) and `loader` (load, attach)."""

from meshagent.bpf.source import bpf_dir, render_source

__all__ = ["bpf_dir", "render_source"]
