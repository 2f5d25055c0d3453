"""meshagent.bpf.abi and bpf.programs must agree with the C: maps,
programs, reasons."""

from __future__ import annotations

import re

from meshagent.bpf import abi, bpf_dir, render_source
from meshagent.bpf.programs import PROGRAM_FILES


def c_text() -> str:
    return "\n".join(p.read_text() for p in sorted(bpf_dir().rglob("*.[ch]")))


def test_every_map_is_named_once_and_fits_the_kernel_limit():
    maps_h = (bpf_dir() / "include" / "maps.h").read_text()
    defined = re.findall(r"^BPF_\w+\((?:\"\w+\",\s*)?(?:[^,]+,\s*)*?(mesh_\w+)", maps_h, re.M)
    declared = re.findall(r"\b(mesh_[a-z0-9_]+)\s*,", maps_h)
    found = {n for n in declared if n in abi.MAP_NAMES} | set(defined)
    assert set(abi.MAP_NAMES) <= found
    for name in abi.MAP_NAMES:
        assert len(name) <= 15, name
    # Maps are defined in maps.h only.
    for path in bpf_dir().rglob("*.[ch]"):
        if path.name != "maps.h":
            assert not re.search(r"^BPF_(HASH|TABLE|ARRAY|PERCPU|LPM)", path.read_text(), re.M), (
                path
            )


def test_reasons_match_the_c_in_order():
    reasons_h = (bpf_dir() / "include" / "reasons.h").read_text()
    values = {
        name.lower(): int(value)
        for name, value in re.findall(r"#define MESH_REASON_(\w+)\s+(\d+)", reasons_h)
    }
    count = values.pop("max")
    assert count == len(abi.REASONS)
    by_value = sorted(values.items(), key=lambda item: item[1])
    assert [v for _, v in by_value] == list(range(count))
    c_names = [n for n, _ in by_value]
    short = {
        "excluded_port": "excl_port",
        "excluded_cidr": "excl_cidr",
        "redirect_failed": "redir_fail",
    }
    assert [short.get(n, n) for n in abi.REASONS] == c_names


def test_one_entry_file_per_program():
    text = render_source()
    for prog, filename in PROGRAM_FILES.items():
        source = (bpf_dir() / filename).read_text()
        assert source.startswith("/* SPDX-License-Identifier:"), filename
        assert re.search(rf"^int {prog}\(", source, re.M), (prog, filename)
        assert f'#line 1 "{filename}"' in text


def test_rendered_source_inlines_each_header_once():
    text = render_source()
    assert '#include "' not in text
    assert text.count('#line 1 "include/maps.h"') == 1
