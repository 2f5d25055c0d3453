"""The BPF side: `programs` (what each program needs), `features` (what the
kernel has), `abi` (names and struct layouts shared with the C), `syscall`
(raw bpf(2), no libbcc) and `loader` (render, compile, load, attach)."""

from meshagent.bpf.loader import bpf_dir, render_source

__all__ = ["bpf_dir", "render_source"]
