"""Compile the BPF programs in a short-lived process of its own.

    python -m meshagent.bpf.build OUT.json [CFLAG ...]

BCC (and with it LLVM and clang, ~100 MB) is loaded here and nowhere else:
the agent runs this once per source, flags and kernel (bpf/objects.py keeps
the result in a cache) and loads the programs itself with raw bpf(2).

The object written is JSON: each map's definition as the kernel holds it
after BCC created it, with the layout of its key and value structs (checked
against bpf/abi.py here and at every load), and each program's
instructions with the places where an instruction names a map
(BPF_PSEUDO_MAP_FD: the map's fd in this process, replaced by the agent's
own). Exit status 0 and the file, or 1 and one line
on stderr saying why.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import time

from meshagent.bpf import abi
from meshagent.bpf import syscall as sc
from meshagent.bpf.programs import PROGRAMS

FORMAT = 2  # of the object written here; bpf/objects.py reads only this format
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two slots, the first holds the fd
PSEUDO_MAP_FD = 1


def relocations(insns: bytes, by_fd: dict[int, str]) -> list[tuple[int, str]]:
    """(instruction index, map name) for every instruction that loads a map."""
    out = []
    index = 0
    while index < len(insns) // 8:
        code, regs, _off, imm = struct.unpack_from("=BBhi", insns, index * 8)
        if code == LD_IMM64:
            if regs >> 4 == PSEUDO_MAP_FD:
                if imm not in by_fd:
                    raise ValueError(f"instruction {index} loads fd {imm}, which is no known map")
                out.append((index, by_fd[imm]))
            index += 2
        else:
            index += 1
    return out


def compiled_layout(desc: bytes) -> abi.Layout | None:
    """A map's key or value type as BCC compiled it: (struct name, fields
    with offset and size), or None for a scalar. BCC describes a struct with
    clang's own layout (the padding as __pad_* fields); its ctypes class
    has the same offsets."""
    import ctypes

    from bcc import BPF

    ctype = BPF._decode_table_type(json.loads(desc))
    if not (isinstance(ctype, type) and issubclass(ctype, ctypes.Structure)):
        return None
    fields = tuple(
        (name, getattr(ctype, name).offset, getattr(ctype, name).size)
        for name, *_type in ctype._fields_
    )
    return ctype.__name__, fields


def build(cflags: list[str]) -> dict:
    from bcc import BPF
    from bcc.libbcc import lib

    from meshagent.bpf.source import render_source

    started = time.monotonic()
    bpf = BPF(text=render_source().encode(), cflags=cflags)
    try:
        maps, by_fd = [], {}
        for spec in abi.MAPS:
            fd = lib.bpf_table_fd(bpf.module, spec.name.encode())
            if fd < 0:
                raise ValueError(f"map {spec.name} is not in the compiled programs")
            info = sc.map_info(fd)
            sc.check_spec(spec, info)
            key = compiled_layout(lib.bpf_table_key_desc(bpf.module, spec.name.encode()))
            value = compiled_layout(lib.bpf_table_leaf_desc(bpf.module, spec.name.encode()))
            abi.check_layouts(spec, key, value)
            by_fd[fd] = spec.name
            maps.append(
                {
                    "name": spec.name,
                    "type": info.map_type,
                    "key_size": info.key_size,
                    "value_size": info.value_size,
                    "max_entries": info.max_entries,
                    "flags": info.flags,
                    "key_struct": key,
                    "value_struct": value,
                }
            )
        programs = {}
        for program in PROGRAMS:
            insns = bytes(bpf.dump_func(program.name.encode()))
            programs[program.name] = {
                "insns": base64.b64encode(insns).decode(),
                "relocations": relocations(insns, by_fd),
            }
        license_ = lib.bpf_module_license(bpf.module).decode()
    finally:
        bpf.cleanup()
    return {
        "format": FORMAT,
        "kernel": os.uname().release,
        "cflags": cflags,
        "license": license_,
        "maps": maps,
        "programs": programs,
        "compile_seconds": round(time.monotonic() - started, 3),
    }


def main(argv: list[str]) -> int:
    out, cflags = argv[0], argv[1:]
    # libbcc and clang print warnings and errors on fd 2: keep them, and say
    # the first error in one line if the compile fails.
    try:
        obj = build(cflags)
    except Exception as exc:
        print(f"BCC could not compile the BPF programs: {_one_line(exc)}", file=sys.stderr)
        return 1
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w") as file:
        json.dump(obj, file)
    os.replace(tmp, out)  # readers see a whole object or none
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
