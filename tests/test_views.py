"""Text views: numactl --hardware, numastat, numastat -p and numa_maps lines."""

from __future__ import annotations

import pytest

from numaemu.topology import Topology
from numaemu.views import (
    NUMASTAT_COUNTERS,
    escape_path,
    hardware_text,
    numa_maps_line,
    numastat_from_numa_maps,
    numastat_process_text,
    numastat_text,
)

# -- numactl --hardware ---------------------------------------------------------------


def test_hardware_text_matches_numactl_layout_for_two_nodes():
    text = hardware_text(Topology.default(), [16000, 15000])
    assert text == (
        "available: 2 nodes (0-1)\n"
        "node 0 cpus: 0 1\n"
        "node 0 size: 64 MB\n"
        "node 0 free: 62 MB\n"
        "node 1 cpus: 2 3\n"
        "node 1 size: 64 MB\n"
        "node 1 free: 58 MB\n"
        "node distances:\n"
        "node     0    1 \n"
        "   0:   10   21 \n"
        "   1:   21   10 \n"
    )


def test_hardware_text_shows_cpuless_and_memoryless_nodes():
    topo = Topology(
        [[10, 20, 32], [20, 10, 255], [32, 255, 10]],
        frames_per_node=[512, 0, 256],
        cpus=[[0, 1], [2], []],
        page_size=8192,
    )
    assert hardware_text(topo, [512, 0, 100]) == (
        "available: 3 nodes (0-2)\n"
        "node 0 cpus: 0 1\n"
        "node 0 size: 4 MB\n"
        "node 0 free: 4 MB\n"
        "node 1 cpus: 2\n"
        "node 1 size: 0 MB\n"
        "node 1 free: 0 MB\n"
        "node 2 cpus:\n"
        "node 2 size: 2 MB\n"
        "node 2 free: 0 MB\n"
        "node distances:\n"
        "node     0    1    2 \n"
        "   0:   10   20   32 \n"
        "   1:   20   10  255 \n"
        "   2:   32  255   10 \n"
    )


def test_hardware_text_needs_one_free_count_per_node():
    with pytest.raises(ValueError, match="free_frames"):
        hardware_text(Topology.default(), [1])


# -- numastat -------------------------------------------------------------------------

STATS = {
    0: {
        "numa_hit": 1234,
        "numa_miss": 0,
        "numa_foreign": 7,
        "interleave_hit": 64,
        "local_node": 1200,
        "other_node": 34,
    },
    1: {
        "numa_hit": 98765,
        "numa_miss": 7,
        "numa_foreign": 0,
        "interleave_hit": 63,
        "local_node": 98700,
        "other_node": 72,
    },
}


def test_numastat_text_matches_the_compatibility_table():
    assert numastat_text(STATS) == (
        "                           node0           node1\n"
        "numa_hit                    1234           98765\n"
        "numa_miss                      0               7\n"
        "numa_foreign                   7               0\n"
        "interleave_hit                64              63\n"
        "local_node                  1200           98700\n"
        "other_node                    34              72\n"
    )


def test_numastat_text_has_16_wide_columns_and_counter_order():
    lines = numastat_text(STATS).splitlines()
    assert all(len(line) == 16 * 3 for line in lines)
    assert lines[0][:16] == " " * 16
    assert lines[0].split() == ["node0", "node1"]
    assert [line.split()[0] for line in lines[1:]] == list(NUMASTAT_COUNTERS)


def test_numastat_text_orders_nodes_and_fills_missing_counters_with_zero():
    lines = numastat_text({2: {"numa_hit": 5}, 0: {}}).splitlines()
    assert lines[0].split() == ["node0", "node2"]
    assert lines[1].split() == ["numa_hit", "0", "5"]
    assert lines[6].split() == ["other_node", "0", "0"]


def test_numastat_text_needs_a_node():
    with pytest.raises(ValueError):
        numastat_text({})


# -- numastat -p ----------------------------------------------------------------------


def test_numastat_process_text_matches_numastat_layout():
    text = numastat_process_text(
        77,
        "worker",
        {"heap": {0: 10}, "stack": {1: 3}, "private": {0: 2560, 1: 256}},
        [0, 1],
        4096,
    )
    assert text == (
        "\n"
        "Per-node process memory usage (in MBs) for PID 77 (worker)\n"
        "                           Node 0          Node 1           Total\n"
        "                  --------------- --------------- ---------------\n"
        "Huge                         0.00            0.00            0.00\n"
        "Heap                         0.04            0.00            0.04\n"
        "Stack                        0.00            0.01            0.01\n"
        "Private                     10.00            1.00           11.00\n"
        "----------------  --------------- --------------- ---------------\n"
        "Total                       10.04            1.01           11.05\n"
    )


def test_numastat_process_text_counts_huge_pages_in_huge_page_size():
    text = numastat_process_text(1, "x", {"Huge": {0: 3}}, [0], 4096)
    huge = text.splitlines()[4]
    assert huge.split() == ["Huge", "6.00", "6.00"]


def test_numastat_process_text_has_a_column_per_node_plus_total():
    text = numastat_process_text(5, "a", {}, [0, 1, 2, 3], 4096)
    lines = text.splitlines()
    assert lines[2].split() == ["Node", "0", "Node", "1", "Node", "2", "Node", "3", "Total"]
    assert all(len(line) == 17 + 16 * 5 for line in lines[2:])


def test_numastat_process_text_rejects_unknown_category_and_node():
    with pytest.raises(ValueError, match="unknown numastat category"):
        numastat_process_text(1, "x", {"shared": {0: 1}}, [0], 4096)
    with pytest.raises(ValueError, match="node 3"):
        numastat_process_text(1, "x", {"heap": {3: 1}}, [0, 1], 4096)


# -- numa_maps ------------------------------------------------------------------------


def test_numa_maps_line_for_anonymous_pages():
    line = numa_maps_line(0x7F0000000000, "bind:1", anon=4, dirty=4, pages=4, per_node={1: 4})
    assert line == "7f0000000000 bind:1 anon=4 dirty=4 N1=4 kernelpagesize_kB=4"


def test_numa_maps_line_without_pages_stops_after_the_policy():
    assert numa_maps_line(0x7F0000000000, "weighted interleave:0-1") == (
        "7f0000000000 weighted interleave:0-1"
    )
    assert numa_maps_line(0x55D0C3A1E000, "default", kind="heap", per_node={0: 0}) == (
        "55d0c3a1e000 default heap"
    )


def test_numa_maps_line_pads_start_to_eight_hex_digits():
    assert numa_maps_line(0x1000, "default") == "00001000 default"


def test_numa_maps_line_prints_mapped_only_when_it_differs_from_anon_and_dirty():
    clean_file = numa_maps_line(0x400000, "default", file="/tmp/data", pages=3, per_node={0: 3})
    assert clean_file == "00400000 default file=/tmp/data mapped=3 N0=3 kernelpagesize_kB=4"
    partly_dirty = numa_maps_line(0x400000, "default", anon=3, dirty=1, pages=3, per_node={0: 3})
    assert "mapped=" not in partly_dirty
    mixed = numa_maps_line(0x400000, "default", anon=2, dirty=1, pages=3, per_node={0: 3})
    assert mixed == "00400000 default anon=2 dirty=1 mapped=3 N0=3 kernelpagesize_kB=4"


def test_numa_maps_line_prints_mapmax_only_above_one():
    shared = numa_maps_line(
        0x7F0000000000,
        "prefer:1",
        file="/dev/zero (deleted)",
        dirty=2,
        pages=2,
        mapmax=2,
        per_node={1: 2},
    )
    assert shared == (
        "7f0000000000 prefer:1 file=/dev/zero\\040(deleted) dirty=2 mapmax=2 N1=2"
        " kernelpagesize_kB=4"
    )
    single = numa_maps_line(0x1000, "local", anon=1, dirty=1, pages=1, mapmax=1, per_node={0: 1})
    assert "mapmax" not in single


def test_numa_maps_line_prints_active_only_when_fewer_than_pages():
    def line(active):
        return numa_maps_line(
            0x1000, "default", anon=4, dirty=4, pages=4, active=active, per_node={0: 4}
        )

    assert "active=" not in line(None)
    assert "active=" not in line(4)
    assert line(1) == "00001000 default anon=4 dirty=4 active=1 N0=4 kernelpagesize_kB=4"


def test_numa_maps_line_keeps_the_kernel_field_order():
    line = numa_maps_line(
        0x2000,
        "interleave=static:0-3",
        kind="stack",
        anon=5,
        dirty=6,
        pages=8,
        mapmax=3,
        swapcache=1,
        active=2,
        writeback=1,
        per_node={3: 2, 0: 6},
    )
    assert line == (
        "00002000 interleave=static:0-3 stack anon=5 dirty=6 mapped=8 mapmax=3 swapcache=1"
        " active=2 writeback=1 N0=6 N3=2 kernelpagesize_kB=4"
    )


def test_numa_maps_line_lists_only_nonzero_nodes_in_order():
    line = numa_maps_line(0x1000, "default", anon=3, dirty=3, pages=3, per_node={2: 1, 0: 0, 1: 2})
    assert line.endswith(" N1=2 N2=1 kernelpagesize_kB=4")
    assert "N0=" not in line


def test_numa_maps_line_file_wins_over_heap_and_stack():
    line = numa_maps_line(0x1000, "default", kind="heap", file="/lib/x.so")
    assert line == "00001000 default file=/lib/x.so"


def test_numa_maps_line_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        numa_maps_line(0x1000, "default", kind="huge")


def test_numa_maps_line_for_hugetlb_uses_huge_page_size_and_no_active():
    line = numa_maps_line(
        0x7F0000000000,
        "default",
        file="/mnt/huge/a",
        huge=True,
        dirty=2,
        pages=2,
        active=0,
        per_node={0: 2},
        page_size=2 << 20,
    )
    assert line == (
        "7f0000000000 default file=/mnt/huge/a huge dirty=2 N0=2 kernelpagesize_kB=2048"
    )


def test_file_paths_escape_space_tab_newline_and_equals_as_octal():
    assert escape_path("/tmp/a b\tc\nd=e\\f") == "/tmp/a\\040b\\011c\\012d\\075e\\f"
    line = numa_maps_line(0x1000, "default", file="/tmp/my file")
    assert line == "00001000 default file=/tmp/my\\040file"


# -- numastat -p from numa_maps -------------------------------------------------------

MAPS = "\n".join(
    [
        "55d0c3a1e000 default heap anon=3 dirty=3 N0=3 kernelpagesize_kB=4",
        "7ffc9d1f0000 local stack anon=5 dirty=5 N0=5 kernelpagesize_kB=4",
        "7f0000000000 interleave:0-1 anon=16 dirty=16 N0=8 N1=8 kernelpagesize_kB=4",
        "7f0000200000 bind:1 file=/tmp/x mapped=2 N1=2 kernelpagesize_kB=4",
        "7f0000400000 default file=/mnt/huge/a huge dirty=1 N0=1 kernelpagesize_kB=2048",
        "7f0000600000 weighted interleave:0-1",
        "",
    ]
)


def test_numastat_from_numa_maps_sums_pages_by_category_and_node():
    assert numastat_from_numa_maps(MAPS) == {
        "huge": {0: 1},
        "heap": {0: 3},
        "stack": {0: 5},
        "private": {0: 8, 1: 10},
    }


def test_numastat_from_numa_maps_of_nothing_is_empty_categories():
    assert numastat_from_numa_maps("") == {"huge": {}, "heap": {}, "stack": {}, "private": {}}


def test_numastat_from_numa_maps_rejects_malformed_node_counts():
    with pytest.raises(ValueError, match="line 1"):
        numastat_from_numa_maps("00001000 default anon=1 N0:1 kernelpagesize_kB=4")


def test_numastat_from_numa_maps_feeds_numastat_process_text():
    text = numastat_process_text(9, "app", numastat_from_numa_maps(MAPS), [0, 1], 4096)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[4:] if line}
    assert rows["Huge"] == ["2.00", "0.00", "2.00"]
    assert rows["Private"] == ["0.03", "0.04", "0.07"]
    assert rows["Total"] == ["2.06", "0.04", "2.10"]
