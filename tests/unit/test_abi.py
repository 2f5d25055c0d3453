"""meshagent.bpf.abi and bpf.programs must agree with the C: maps,
programs, reasons."""

from __future__ import annotations

import re

import pytest

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


def test_every_reason_is_counted_somewhere_unless_reserved():
    """Reasons are never renumbered: one no hook counts any more stays, and
    reasons.h marks it reserved."""
    reasons_h = (bpf_dir() / "include" / "reasons.h").read_text()
    marks = dict(re.findall(r"#define MESH_REASON_(\w+)\s+\d+\s+/\* (\w+)", reasons_h))
    marks.pop("MAX")
    used = "\n".join(
        re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
        for path in bpf_dir().rglob("*.[ch]")
        if path.name != "reasons.h"
    )
    counted = set(re.findall(r"\bMESH_REASON_(\w+)", used)) - {"MAX"}
    reserved = {name for name, mark in marks.items() if mark == "reserved"}
    assert reserved == {"SKIP_MARK", "INTERNAL"}
    assert counted == set(marks) - reserved


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


# -- struct layouts (the compiled side is checked at every load; here the logic
# and, without a compiler, the C's natural alignment of each struct in maps.h)
C_TYPES = {
    "__u8": (1, 1),
    "__u16": (2, 2),
    "__u32": (4, 4),
    "__s32": (4, 4),
    "__u64": (8, 8),
    "__s64": (8, 8),
    "char": (1, 1),
}
C_TYPES["struct mesh_addr"] = (16, 4)


def maps_h_layouts() -> dict[str, abi.Layout]:
    """Each struct in maps.h laid out as a C compiler does (natural alignment)."""
    text = re.sub(r"/\*.*?\*/", "", (bpf_dir() / "include" / "maps.h").read_text(), flags=re.S)
    out = {}
    for name, body in re.findall(r"^struct (mesh_\w+) \{(.*?)^\};", text, re.M | re.S):
        fields, offset = [], 0
        for ctype, field, count in re.findall(
            r"^\s*(struct \w+|\w+)\s+(\w+)(?:\[(\d+)\])?;", body, re.M
        ):
            size, align = C_TYPES[ctype]
            offset = -(-offset // align) * align
            fields.append((field, offset, size * int(count or 1)))
            offset += size * int(count or 1)
        out[name] = (name, tuple(fields))
    return out


def test_every_struct_python_packs_has_the_c_fields_at_the_c_offsets():
    in_c = maps_h_layouts()
    structs = {v.name: v for v in vars(abi).values() if isinstance(v, abi.CStruct)}
    assert set(in_c) - set(structs) == {"mesh_addr"}  # packed as 16 bytes wherever it is a field
    for name, python in structs.items():
        assert abi.layout_differences(python, in_c[name]) == [], name
    for spec in abi.MAPS:
        for part in (spec.key, spec.value):
            assert isinstance(part, abi.CStruct) or part.size in (0, 1, 2, 4, 8), spec.name


def test_layout_differences_name_each_field_whose_offset_or_size_differs():
    compiled = ("mesh_orig", abi.ORIG.layout())
    assert abi.layout_differences(abi.ORIG, compiled) == []
    # Same size, two fields swapped: only offsets tell.
    swapped = abi.CStruct(
        "mesh_orig",
        ("addr", "16s"), ("pod_id", "I"), ("port", "H"), ("flags", "H"), ("netns", "Q"),
        ("cookie", "Q"),
    )  # fmt: skip
    assert swapped.size == abi.ORIG.size
    assert abi.layout_differences(swapped, compiled) == [
        "mesh_orig.pod_id: Python packs 4 bytes at offset 16, the compiled C has 4 at 20",
        "mesh_orig.port: Python packs 2 bytes at offset 20, the compiled C has 2 at 16",
        "mesh_orig.flags: Python packs 2 bytes at offset 22, the compiled C has 2 at 18",
    ]
    # Padding the compiler put in moves what follows it.
    padded = ("mesh_pod", (("pod_id", 0, 4), ("__pad_1", 4, 4), ("port", 8, 2), ("flags", 10, 2)))
    assert abi.layout_differences(abi.POD, padded) == [
        "mesh_pod.port: Python packs 2 bytes at offset 4, the compiled C has 2 at 8",
        "mesh_pod.flags: Python packs 2 bytes at offset 6, the compiled C has 2 at 10",
    ]
    renamed = ("mesh_pod", (("pod_id", 0, 4), ("port", 4, 2), ("policy", 6, 2)))
    assert abi.layout_differences(abi.POD, renamed) == [
        "mesh_pod.flags is not in the compiled C",
        "mesh_pod.policy (offset 6) is not packed by Python",
    ]
    assert abi.layout_differences(abi.POD, ("mesh_tuple", ())) == [
        "Python packs struct mesh_pod, the compiled C has struct mesh_tuple"
    ]
    assert abi.layout_differences(abi.U64, None) == []
    assert abi.layout_differences(abi.U64, compiled) == [
        "Python packs a scalar, the compiled C has struct mesh_orig"
    ]
    with pytest.raises(ValueError, match=r"^map mesh_orig_tup: mesh_orig\.port: Python packs"):
        abi.check_layouts(
            abi.ORIG_TUP, ("mesh_tuple", abi.TUPLE.layout()), ("mesh_orig", swapped.layout())
        )
