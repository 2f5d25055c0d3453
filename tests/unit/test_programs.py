"""The requirements table in bpf/programs.py against the C: each entry
file calls exactly the helpers listed for its program, says the minimum
kernel the table computes, and the probe knows every helper's id."""

from __future__ import annotations

import re

import pytest

from meshagent.bpf import bpf_dir, render_source
from meshagent.bpf.programs import HELPER_IDS, PROGRAMS, Kind

# bpf_* names that are macros, not helpers; trace_printk only with MESH_DEBUG.
NOT_HELPERS = {"bpf_htonl", "bpf_ntohl", "bpf_htons", "bpf_ntohs", "bpf_trace_printk"}
BCC_METHODS = {
    "ringbuf_output": "bpf_ringbuf_output",
    "lookup": "bpf_map_lookup_elem",
    "update": "bpf_map_update_elem",
    "delete": "bpf_map_delete_elem",
    "sk_redirect_hash": "bpf_sk_redirect_hash",
    "msg_redirect_hash": "bpf_msg_redirect_hash",
    "sock_hash_update": "bpf_sock_hash_update",
}
MAP_HELPERS = {"bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem"}


def helpers_called(text: str) -> set[str]:
    code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    code = re.sub(r"#if MESH_TEST_REFUSE\n.*?#endif", "", code, flags=re.S)  # tests only
    code = re.sub(r"#if MESH_HAVE_\w+\n.*?#endif", "", code, flags=re.S)  # optional: below
    called = set(re.findall(r"\b(bpf_[a-z0-9_]+)\s*\(", code)) - NOT_HELPERS
    called |= {BCC_METHODS[m] for m in re.findall(r"\.(\w+)\(", code) if m in BCC_METHODS}
    return called


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
def test_each_program_calls_exactly_the_helpers_it_lists(program):
    called = helpers_called(render_source((program.file,)))
    listed = {h for h in program.helpers if not h.startswith("bpf_map_")}
    assert called - {"bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem"} == listed
    assert called <= program.helpers


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
def test_the_minimum_kernel_in_each_file_is_the_tables(program):
    header = (bpf_dir() / program.file).read_text().split("#include", 1)[0]
    match = re.search(r"Minimum\s+kernel:\s+(\d+)\.(\d+)", header)
    assert match, f"{program.file} names no minimum kernel"
    assert (int(match.group(1)), int(match.group(2))) == program.min_kernel


def test_every_helper_feature_has_probe_ids_and_names_are_short():
    for program in PROGRAMS:
        assert len(program.name) <= 15
        for helper in program.helpers:
            assert helper in HELPER_IDS, helper
        for name in program.needs:
            from meshagent.bpf.programs import FEATURES_BY_NAME

            feature = FEATURES_BY_NAME[name]
            if feature.kind is Kind.HELPER:
                assert feature.prog_type == program.prog_type, (program.name, name)


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
def test_optional_helpers_are_called_only_under_their_have_macro(program):
    from meshagent.bpf.programs import FEATURES_BY_NAME, have_macro

    text = re.sub(r"/\*.*?\*/", "", render_source((program.file,)), flags=re.S)
    blocks = dict(re.findall(r"#if (MESH_HAVE_\w+)\n(.*?)#endif", text, flags=re.S))
    expected = {have_macro(name): FEATURES_BY_NAME[name].helpers for name in program.optional}
    assert set(blocks) == set(expected)
    for macro, helpers in expected.items():
        assert helpers_called(blocks[macro]) - MAP_HELPERS == set(helpers), macro


def test_every_map_type_the_table_probes_is_named_in_the_syscall_module():
    from meshagent.bpf.programs import KERNEL_FEATURES
    from meshagent.bpf.syscall import MapType

    for feature in KERNEL_FEATURES:
        if feature.kind is Kind.MAP:
            assert MapType[feature.name.upper()].name.lower() == feature.name
