"""Tests for coordinator.mempolicy: policy validation, readback, numa_maps text, placement."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from coordinator.mempolicy import (
    AllocPlan,
    MemPolicy,
    check_mbind_flags,
    get_nodes,
    get_policy_readback,
    interleave_nodes,
    new_policy,
    next_interleave_node,
    plan_allocation,
    policy_text,
    read_nodes,
    sanitize_mode_flags,
    validate_get_flags,
)
from numaemu.constants import MAX_NUMNODES, MPOL_MAX, GetFlag, Mode, ModeFlag, MoveFlag
from numaemu.errors import NumaError

STATIC = int(ModeFlag.STATIC_NODES)
RELATIVE = int(ModeFlag.RELATIVE_NODES)
BALANCING = int(ModeFlag.NUMA_BALANCING)
TWO_NODES = (0, 1)
FOUR_NODES = (0, 1, 2, 3)
NEEDS_NODES = [Mode.BIND, Mode.INTERLEAVE, Mode.WEIGHTED_INTERLEAVE, Mode.PREFERRED_MANY]

# Symmetric 4-node machine: two pairs of close nodes.
SYMMETRIC = [
    [10, 20, 30, 30],
    [20, 10, 30, 30],
    [30, 30, 10, 20],
    [30, 30, 20, 10],
]
# Asymmetric 4-node machine: d[0][2] = 20 but d[2][0] = 25; from node 3, nodes 1 and 2 tie.
ASYMMETRIC = [
    [10, 40, 20, 30],
    [40, 10, 30, 20],
    [25, 30, 10, 20],
    [30, 20, 20, 10],
]


def expect(err: int, fn, *args, **kwargs) -> NumaError:
    """Call fn, check it raises NumaError with errno err and a real message, return it."""
    with pytest.raises(NumaError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    assert info.value.strerror and len(info.value.strerror) > 10
    return info.value


def policy(mode: int, nodes, node_set=FOUR_NODES) -> MemPolicy | None:
    return new_policy(mode, nodes, node_set=node_set)


def plan(pol, *, cpu=0, n=None, ilx=None, free=(100, 100, 100, 100), dist=SYMMETRIC, weights=None):
    if ilx is None:
        ilx = np.arange(n, dtype=np.int64)
    return plan_allocation(
        pol,
        cpu_node=cpu,
        ilx=np.asarray(ilx, dtype=np.int64),
        free=np.asarray(free, dtype=np.int64),
        distances=dist,
        weights=weights,
    )


# ---------------------------------------------------------------------------------------------
# Mode and flag sanitising (set_mempolicy, mbind)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [-1, MPOL_MAX, 8, 100, MPOL_MAX | STATIC, -1 & ~STATIC])
def test_unknown_mode_is_einval(mode):
    expect(errno.EINVAL, policy, mode, [0])


def test_non_integer_mode_is_einval():
    expect(errno.EINVAL, policy, "bind", [0])


def test_static_and_relative_together_is_einval():
    expect(errno.EINVAL, policy, Mode.BIND | STATIC | RELATIVE, [0])


@pytest.mark.parametrize("mode", [Mode.BIND, Mode.PREFERRED_MANY])
def test_numa_balancing_is_accepted_with_bind_and_preferred_many(mode):
    pol = policy(mode | BALANCING, [0, 1])
    assert pol.flags == BALANCING
    assert pol.nodes == (0, 1)


@pytest.mark.parametrize(
    "mode", [Mode.DEFAULT, Mode.PREFERRED, Mode.INTERLEAVE, Mode.LOCAL, Mode.WEIGHTED_INTERLEAVE]
)
def test_numa_balancing_with_other_modes_is_einval(mode):
    expect(errno.EINVAL, policy, mode | BALANCING, [0])


def test_sanitize_mode_flags_splits_mode_and_flags():
    assert sanitize_mode_flags(Mode.INTERLEAVE | STATIC) == (Mode.INTERLEAVE, STATIC)
    assert sanitize_mode_flags(Mode.PREFERRED_MANY | BALANCING) == (Mode.PREFERRED_MANY, BALANCING)


# ---------------------------------------------------------------------------------------------
# Reading the nodes (the nodemask copy)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [object(), 5, "01", [0, "1"], [0.5], [True], [[0]]])
def test_unreadable_nodes_is_efault(nodes):
    expect(errno.EFAULT, policy, Mode.PREFERRED, nodes)


@pytest.mark.parametrize("node", [MAX_NUMNODES, MAX_NUMNODES + 5, -1])
def test_node_outside_max_numnodes_is_einval(node):
    expect(errno.EINVAL, policy, Mode.BIND, [0, node])


def test_read_nodes_accepts_any_integer_iterable():
    assert read_nodes(None) == ()
    assert read_nodes(iter([3, 1, 3])) == (1, 3)
    assert read_nodes(np.array([2, 0], dtype=np.int16)) == (0, 2)
    assert read_nodes(range(MAX_NUMNODES - 1, MAX_NUMNODES)) == (MAX_NUMNODES - 1,)


def test_highest_legal_node_is_dropped_silently_when_it_does_not_exist():
    assert policy(Mode.BIND, [1, MAX_NUMNODES - 1]).nodes == (1,)


# ---------------------------------------------------------------------------------------------
# Mode versus mask (mpol_new) and the node set (mpol_set_nodemask)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [None, [], ()])
def test_default_without_nodes_is_no_policy(nodes):
    assert policy(Mode.DEFAULT, nodes) is None


def test_default_with_a_node_is_einval():
    expect(errno.EINVAL, policy, Mode.DEFAULT, [0])


def test_default_with_only_a_nonexistent_node_is_still_einval():
    # The mode-versus-mask rule sees the raw mask, before the node set drops anything.
    expect(errno.EINVAL, policy, Mode.DEFAULT, [40])


@pytest.mark.parametrize("nodes", [None, []])
def test_bind_without_nodes_is_einval(nodes):
    err = expect(errno.EINVAL, policy, Mode.BIND, nodes)
    assert "MPOL_BIND needs at least one node" in err.strerror


@pytest.mark.parametrize("mode", NEEDS_NODES)
def test_modes_that_need_nodes_reject_an_empty_set(mode):
    err = expect(errno.EINVAL, policy, mode, None)
    assert f"MPOL_{mode.name}" in err.strerror


def test_local_without_nodes_is_local_allocation():
    assert policy(Mode.LOCAL, None) == MemPolicy(Mode.LOCAL, (), 0, ())


def test_local_with_a_node_is_einval():
    expect(errno.EINVAL, policy, Mode.LOCAL, [0])


@pytest.mark.parametrize("flag", [STATIC, RELATIVE])
def test_local_with_static_or_relative_is_einval(flag):
    expect(errno.EINVAL, policy, Mode.LOCAL | flag, None)


def test_preferred_without_nodes_becomes_local():
    assert policy(Mode.PREFERRED, None) == MemPolicy(Mode.LOCAL, (), 0, ())
    assert policy(Mode.PREFERRED, []) == MemPolicy(Mode.LOCAL, (), 0, ())


@pytest.mark.parametrize("flag", [STATIC, RELATIVE])
def test_preferred_without_nodes_rejects_static_and_relative(flag):
    expect(errno.EINVAL, policy, Mode.PREFERRED | flag, None)


def test_preferred_with_several_nodes_keeps_the_lowest():
    assert policy(Mode.PREFERRED, [3, 1]).nodes == (1,)


def test_preferred_keeps_the_lowest_node_that_survives_the_node_set():
    assert policy(Mode.PREFERRED, [0, 2, 3], node_set=(2, 3)).nodes == (2,)


@pytest.mark.parametrize("mode", [Mode.BIND, Mode.INTERLEAVE, Mode.PREFERRED])
def test_one_node_policies_keep_their_node(mode):
    pol = policy(mode, [1])
    assert (pol.mode, pol.nodes, pol.flags, pol.user_nodes) == (mode, (1,), 0, ())


def test_nonexistent_nodes_are_dropped_silently():
    assert policy(Mode.BIND, [0, 40], node_set=TWO_NODES).nodes == (0,)


@pytest.mark.parametrize("mode", NEEDS_NODES + [Mode.PREFERRED])
def test_only_nonexistent_nodes_is_einval(mode):
    err = expect(errno.EINVAL, policy, mode, [40], node_set=TWO_NODES)
    assert "40" in err.strerror


def test_memoryless_or_disallowed_nodes_count_as_absent():
    # Node 1 exists but is not in the node set (no memory, or outside the cpuset).
    assert policy(Mode.INTERLEAVE, [0, 1, 2], node_set=(0, 2)).nodes == (0, 2)
    expect(errno.EINVAL, policy, Mode.BIND, [1], node_set=(0, 2))


def test_relative_nodes_fold_onto_the_node_set():
    pol = policy(Mode.BIND | RELATIVE, [0, 2, 4], node_set=(2, 3, 5))
    assert pol.nodes == (2, 3, 5)
    assert pol.user_nodes == (0, 2, 4)


@pytest.mark.parametrize(
    ("user", "effective"),
    [([0], (2,)), ([1], (3,)), ([2], (5,)), ([3], (2,)), ([4], (3,)), ([1, 4], (3,))],
)
def test_relative_node_n_maps_to_the_n_mod_w_th_node_of_the_set(user, effective):
    assert policy(Mode.INTERLEAVE | RELATIVE, user, node_set=(2, 3, 5)).nodes == effective


def test_relative_preferred_keeps_the_lowest_mapped_node():
    pol = policy(Mode.PREFERRED | RELATIVE, [1, 2], node_set=(2, 3, 5))
    assert pol.nodes == (3,)
    assert get_policy_readback(pol) == (Mode.PREFERRED | RELATIVE, (1, 2))


def test_static_nodes_intersect_and_keep_the_user_mask():
    pol = policy(Mode.BIND | STATIC, [1, 5])
    assert pol.nodes == (1,)
    assert pol.user_nodes == (1, 5)


def test_static_nodes_without_overlap_is_einval():
    expect(errno.EINVAL, policy, Mode.BIND | STATIC, [5, 6])


def test_relative_with_an_empty_node_set_is_einval():
    expect(errno.EINVAL, policy, Mode.BIND | RELATIVE, [0], node_set=())


def test_weighted_interleave_and_preferred_many_keep_every_node():
    assert policy(Mode.WEIGHTED_INTERLEAVE, [0, 1]).nodes == (0, 1)
    assert policy(Mode.PREFERRED_MANY, [3, 1]).nodes == (1, 3)


def test_equal_requests_give_equal_policies():
    assert policy(Mode.BIND, [0, 40]) == policy(Mode.BIND, [0])
    assert policy(Mode.BIND | STATIC, [0, 40]) != policy(Mode.BIND | STATIC, [0])
    assert hash(policy(Mode.INTERLEAVE, [0, 1])) == hash(policy(Mode.INTERLEAVE, [1, 0]))


def test_mempolicy_never_holds_default():
    with pytest.raises(ValueError):
        MemPolicy(Mode.DEFAULT, (), 0, ())


# ---------------------------------------------------------------------------------------------
# Check order
# ---------------------------------------------------------------------------------------------


def test_mode_errors_come_before_nodemask_errors():
    expect(errno.EINVAL, policy, -1, object())
    expect(errno.EINVAL, policy, Mode.BIND | STATIC | RELATIVE, object())
    expect(errno.EINVAL, policy, Mode.INTERLEAVE | BALANCING, object())


def test_nodemask_errors_come_before_mode_versus_mask_rules():
    expect(errno.EFAULT, policy, Mode.DEFAULT, object())
    expect(errno.EFAULT, policy, Mode.LOCAL, [0, "x"])
    err = expect(errno.EINVAL, policy, Mode.LOCAL, [MAX_NUMNODES])
    assert "MAX_NUMNODES" in err.strerror


def test_mode_versus_mask_rules_come_before_the_node_set():
    err = expect(errno.EINVAL, policy, Mode.LOCAL, [40], node_set=TWO_NODES)
    assert "MPOL_LOCAL" in err.strerror


def test_messages_name_the_call():
    assert expect(errno.EINVAL, policy, Mode.BIND, None).strerror.startswith("set_mempolicy")
    err = expect(errno.EINVAL, new_policy, Mode.BIND, None, node_set=FOUR_NODES, for_mbind=True)
    assert err.strerror.startswith("mbind")


# ---------------------------------------------------------------------------------------------
# mbind flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0, 1, 2, 4, 3, 5, 6, 7])
def test_mbind_accepts_strict_move_and_move_all(flags):
    check_mbind_flags(flags)
    check_mbind_flags(MoveFlag(flags))


@pytest.mark.parametrize("flags", [-1, 8, 16, 1 << 31, 0x9])
def test_mbind_unknown_flags_are_einval(flags):
    expect(errno.EINVAL, check_mbind_flags, flags)


# ---------------------------------------------------------------------------------------------
# The raw nodemask and maxnode (get_nodes)
# ---------------------------------------------------------------------------------------------


def test_maxnode_off_by_one_reads_only_maxnode_minus_one_bits():
    node = 3
    assert get_nodes(1 << node, node + 1) == ()
    assert get_nodes(1 << node, node + 2) == (node,)
    expect(errno.EINVAL, new_policy, Mode.BIND, get_nodes(1 << node, node + 1), node_set=range(8))


@pytest.mark.parametrize("maxnode", [0, 1, 5])
def test_null_mask_is_empty_for_any_maxnode(maxnode):
    assert get_nodes(None, maxnode) == ()


def test_maxnode_one_is_empty():
    assert get_nodes(0b11, 1) == ()


def test_maxnode_zero_with_a_mask_is_einval():
    expect(errno.EINVAL, get_nodes, 1, 0)


@pytest.mark.parametrize("maxnode", [4096 * 8 + 2, -1, 1 << 40])
def test_maxnode_too_large_is_einval(maxnode):
    expect(errno.EINVAL, get_nodes, 1, maxnode)


def test_largest_maxnode_is_accepted():
    assert get_nodes(0b101, 4096 * 8 + 1) == (0, 2)


def test_mask_bit_at_max_numnodes_is_einval_only_when_read():
    expect(errno.EINVAL, get_nodes, 1 << MAX_NUMNODES, MAX_NUMNODES + 2)
    assert get_nodes(1 << MAX_NUMNODES | 1, MAX_NUMNODES + 1) == (0,)


def test_unreadable_mask_is_efault():
    expect(errno.EFAULT, get_nodes, "0x1", 8)


# ---------------------------------------------------------------------------------------------
# get_mempolicy readback
# ---------------------------------------------------------------------------------------------


def test_no_policy_reads_back_as_default_with_no_nodes():
    assert get_policy_readback(None) == (0, ())


def test_local_and_empty_preferred_read_back_as_local():
    assert get_policy_readback(policy(Mode.LOCAL, None)) == (4, ())
    assert get_policy_readback(policy(Mode.PREFERRED, None)) == (4, ())


@pytest.mark.parametrize(
    ("mode", "nodes", "expected"),
    [
        (Mode.BIND, [1], (2, (1,))),
        (Mode.INTERLEAVE, [1], (3, (1,))),
        (Mode.PREFERRED, [1], (1, (1,))),
        (Mode.PREFERRED, [3, 1], (1, (1,))),
        (Mode.INTERLEAVE, [0, 1, 2, 3], (3, (0, 1, 2, 3))),
        (Mode.WEIGHTED_INTERLEAVE, [0, 2], (6, (0, 2))),
        (Mode.PREFERRED_MANY, [1, 2], (5, (1, 2))),
        (Mode.BIND, [0, 40], (2, (0,))),
    ],
)
def test_set_then_get_returns_mode_and_effective_nodes(mode, nodes, expected):
    assert get_policy_readback(policy(mode, nodes)) == expected


def test_static_reads_back_with_flag_and_user_nodes():
    assert get_policy_readback(policy(Mode.BIND | STATIC, [1, 5])) == (Mode.BIND | STATIC, (1, 5))


def test_relative_reads_back_with_flag_and_user_nodes():
    pol = policy(Mode.INTERLEAVE | RELATIVE, [0, 2, 4], node_set=(2, 3, 5))
    assert get_policy_readback(pol) == (Mode.INTERLEAVE | RELATIVE, (0, 2, 4))


def test_balancing_reads_back_with_flag_and_effective_nodes():
    pol = policy(Mode.BIND | BALANCING, [1, 40])
    assert get_policy_readback(pol) == (Mode.BIND | BALANCING, (1,))


# ---------------------------------------------------------------------------------------------
# get_mempolicy flags
# ---------------------------------------------------------------------------------------------

NODE, ADDR, MEMS = int(GetFlag.NODE), int(GetFlag.ADDR), int(GetFlag.MEMS_ALLOWED)


@pytest.mark.parametrize("flags", [-1, 8, 16, 0xFF])
def test_get_mempolicy_unknown_flags_are_einval(flags):
    expect(errno.EINVAL, validate_get_flags, flags, False, True)


@pytest.mark.parametrize("flags", [MEMS | NODE, MEMS | ADDR, MEMS | NODE | ADDR])
def test_mems_allowed_with_node_or_addr_is_einval(flags):
    expect(errno.EINVAL, validate_get_flags, flags, True, True)


@pytest.mark.parametrize("flags", [0, NODE])
def test_address_without_f_addr_is_einval(flags):
    expect(errno.EINVAL, validate_get_flags, flags, True, True)


def test_f_node_without_f_addr_needs_an_interleave_task_policy():
    expect(errno.EINVAL, validate_get_flags, NODE, False, False)
    validate_get_flags(NODE, False, True)


@pytest.mark.parametrize(
    ("flags", "addr_given"),
    [(0, False), (ADDR, True), (ADDR, False), (NODE | ADDR, True), (MEMS, False), (MEMS, True)],
)
def test_valid_get_mempolicy_flags_pass(flags, addr_given):
    validate_get_flags(flags, addr_given, False)


def test_next_interleave_node_starts_at_the_lowest_node_and_wraps():
    pol = policy(Mode.INTERLEAVE, [1, 3])
    assert [next_interleave_node(pol, c, None) for c in range(5)] == [1, 3, 1, 3, 1]


def test_next_weighted_interleave_node_stays_for_its_weight():
    pol = policy(Mode.WEIGHTED_INTERLEAVE, [0, 1])
    got = [next_interleave_node(pol, c, [3, 1]) for c in range(8)]
    assert got == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("pol", [None, MemPolicy(Mode.BIND, (0,)), MemPolicy(Mode.LOCAL, ())])
def test_next_interleave_node_without_interleave_is_einval(pol):
    expect(errno.EINVAL, next_interleave_node, pol, 0, None)


# ---------------------------------------------------------------------------------------------
# numa_maps policy text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pol", "text"),
    [
        (None, "default"),
        (MemPolicy(Mode.LOCAL, ()), "local"),
        (MemPolicy(Mode.PREFERRED, (1,)), "prefer:1"),
        (MemPolicy(Mode.BIND, (0, 1)), "bind:0-1"),
        (MemPolicy(Mode.INTERLEAVE, (0, 1, 2, 3)), "interleave:0-3"),
        (MemPolicy(Mode.INTERLEAVE, (0, 1, 2, 3, 5, 7, 8)), "interleave:0-3,5,7-8"),
        (MemPolicy(Mode.WEIGHTED_INTERLEAVE, (0, 1)), "weighted interleave:0-1"),
        (MemPolicy(Mode.PREFERRED_MANY, (0, 1)), "prefer (many):0-1"),
        (MemPolicy(Mode.PREFERRED_MANY, (0, 2)), "prefer (many):0,2"),
        (MemPolicy(Mode.BIND, (0, 1), STATIC, (0, 1, 9)), "bind=static:0-1"),
        (MemPolicy(Mode.INTERLEAVE, (2, 3), RELATIVE, (0, 1)), "interleave=relative:2-3"),
        (MemPolicy(Mode.BIND, (1,), BALANCING), "bind=balancing:1"),
        (MemPolicy(Mode.BIND, (0, 1), STATIC | BALANCING, (0, 1)), "bind=static|balancing:0-1"),
        (MemPolicy(Mode.BIND, (), 0), "bind"),
    ],
)
def test_policy_text_matches_numa_maps(pol, text):
    assert policy_text(pol) == text


def test_policy_text_of_empty_preferred_is_local():
    assert policy_text(policy(Mode.PREFERRED, None)) == "local"


# ---------------------------------------------------------------------------------------------
# Interleave targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [(0, 1), (0, 1, 2, 3), (1, 3), (0, 2, 3)])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("first", [0, 7, 0x7F0000001])
def test_interleave_gives_k_pages_per_node_for_k_times_s_consecutive_indexes(nodes, k, first):
    pol = MemPolicy(Mode.INTERLEAVE, nodes)
    targets = interleave_nodes(pol, np.arange(first, first + k * len(nodes)), None)
    assert targets.dtype == np.int16
    counts = np.bincount(targets, minlength=4)
    assert {int(n): int(counts[n]) for n in np.flatnonzero(counts)} == {n: k for n in nodes}


def test_interleave_index_picks_the_nth_lowest_node():
    pol = MemPolicy(Mode.INTERLEAVE, (1, 3))
    assert interleave_nodes(pol, np.array([0, 1, 2, 5, 10, 11]), None).tolist() == [1, 3] * 3


def test_weighted_interleave_three_one_puts_three_of_four_on_node_zero():
    pol = MemPolicy(Mode.WEIGHTED_INTERLEAVE, (0, 1))
    got = interleave_nodes(pol, np.arange(8), [3, 1])
    assert got.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("weights", [None, [1, 1, 1, 1], [0, 0, 0, 0], [], [1]])
def test_weighted_interleave_with_default_weights_is_plain_interleave(weights):
    ilx = np.arange(100, 140)
    plain = interleave_nodes(MemPolicy(Mode.INTERLEAVE, (0, 2, 3)), ilx, None)
    weighted = interleave_nodes(MemPolicy(Mode.WEIGHTED_INTERLEAVE, (0, 2, 3)), ilx, weights)
    assert weighted.tolist() == plain.tolist()


def test_weighted_interleave_uses_only_the_weights_of_its_nodes():
    pol = MemPolicy(Mode.WEIGHTED_INTERLEAVE, (1, 3))
    got = interleave_nodes(pol, np.arange(5), [9, 2, 9, 3])
    assert got.tolist() == [1, 1, 3, 3, 3]


def test_plain_interleave_ignores_weights():
    pol = MemPolicy(Mode.INTERLEAVE, (0, 1))
    assert interleave_nodes(pol, np.arange(4), [3, 1]).tolist() == [0, 1, 0, 1]


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def test_local_places_pages_on_the_cpu_node():
    for pol in (None, MemPolicy(Mode.LOCAL, ())):
        result = plan(pol, cpu=2, n=16)
        assert set(result.nodes.tolist()) == {2}
        assert set(result.intended.tolist()) == {2}
        assert not result.interleave


def test_local_falls_back_nearest_first_on_an_asymmetric_matrix():
    # From node 0: itself, then node 2 (20), node 3 (30), node 1 (40).
    result = plan(None, cpu=0, n=8, free=(2, 5, 1, 3), dist=ASYMMETRIC)
    assert result.nodes.tolist() == [0, 0, 2, 3, 3, 3, 1, 1]
    assert set(result.intended.tolist()) == {0}


def test_local_fallback_uses_the_row_of_the_cpu_node():
    # From node 2: node 3 (20) before node 0 (25), although d[0][2] is 20.
    result = plan(None, cpu=2, n=3, free=(5, 5, 1, 1), dist=ASYMMETRIC)
    assert result.nodes.tolist() == [2, 3, 0]


def test_fallback_distance_ties_go_to_the_lower_node():
    # From node 3, nodes 1 and 2 are both at distance 20.
    result = plan(None, cpu=3, n=3, free=(5, 1, 5, 0), dist=ASYMMETRIC)
    assert result.nodes.tolist() == [1, 2, 2]


def test_local_skips_a_cpu_node_without_memory():
    result = plan(None, cpu=1, n=2, free=(5, 0, 5, 5))
    assert result.nodes.tolist() == [0, 0]
    assert set(result.intended.tolist()) == {1}


def test_preferred_places_every_page_on_its_node_while_it_has_frames():
    result = plan(MemPolicy(Mode.PREFERRED, (3,)), cpu=0, n=16)
    assert set(result.nodes.tolist()) == {3}


def test_preferred_splits_the_batch_when_its_node_is_partly_full():
    # Preferred node 3 has 3 frames; the rest go to the node nearest 3 (node 2), not to the CPU.
    result = plan(MemPolicy(Mode.PREFERRED, (3,)), cpu=0, n=5, free=(100, 100, 100, 3))
    assert result.nodes.tolist() == [3, 3, 3, 2, 2]
    assert set(result.intended.tolist()) == {3}


def test_preferred_falls_back_when_its_node_is_full():
    result = plan(MemPolicy(Mode.PREFERRED, (1,)), cpu=3, n=4, free=(100, 0, 100, 100))
    assert result.nodes.tolist() == [0, 0, 0, 0]


def test_bind_places_pages_on_the_bound_node_nearest_the_cpu():
    result = plan(MemPolicy(Mode.BIND, (1, 2)), cpu=3, n=4)
    assert set(result.nodes.tolist()) == {2}
    assert set(result.intended.tolist()) == {2}


def test_bind_falls_back_only_within_its_nodes():
    result = plan(MemPolicy(Mode.BIND, (0, 3)), cpu=1, n=5, free=(2, 100, 100, 100))
    # From node 1: node 0 (20) before node 3 (30); nodes 1 and 2 are never used.
    assert result.nodes.tolist() == [0, 0, 3, 3, 3]
    assert set(result.intended.tolist()) == {0}


def test_bind_is_enomem_when_its_nodes_are_full():
    free = np.array([100, 0, 0, 100], dtype=np.int64)
    before = free.copy()
    err = expect(errno.ENOMEM, plan, MemPolicy(Mode.BIND, (1, 2)), cpu=1, n=1, free=free)
    assert "MPOL_BIND" in err.strerror
    assert free.tolist() == before.tolist()  # nothing was taken from any node


def test_bind_is_enomem_when_the_batch_outgrows_its_nodes():
    expect(errno.ENOMEM, plan, MemPolicy(Mode.BIND, (1,)), cpu=0, n=3, free=(100, 2, 100, 100))


def test_whole_machine_full_is_enomem():
    for pol in (None, MemPolicy(Mode.PREFERRED, (1,)), MemPolicy(Mode.INTERLEAVE, (0, 1))):
        expect(errno.ENOMEM, plan, pol, n=1, free=(0, 0, 0, 0))


def test_batch_larger_than_the_machine_is_enomem():
    expect(errno.ENOMEM, plan, None, n=10, free=(2, 2, 2, 2))


def test_empty_batch_plans_nothing():
    result = plan(None, n=0, free=(0, 0, 0, 0))
    assert result.nodes.tolist() == [] and result.intended.tolist() == []


def test_preferred_many_uses_the_nearest_member_then_the_set_then_any_node():
    pol = MemPolicy(Mode.PREFERRED_MANY, (1, 3))
    result = plan(pol, cpu=0, n=6, free=(100, 2, 100, 2))
    # From node 0: node 1 (20), node 3 (30); then outside the set, node 0 itself first.
    assert result.nodes.tolist() == [1, 1, 3, 3, 0, 0]


def test_preferred_many_outside_its_set_falls_back_nearest_the_cpu():
    pol = MemPolicy(Mode.PREFERRED_MANY, (2, 3))
    result = plan(pol, cpu=0, n=3, free=(0, 100, 1, 0))
    assert result.nodes.tolist() == [2, 1, 1]


def test_interleave_plan_places_pages_on_their_targets():
    pol = MemPolicy(Mode.INTERLEAVE, (1, 3))
    result = plan(pol, ilx=np.arange(10, 18))
    assert result.nodes.tolist() == [1, 3] * 4
    assert result.intended.tolist() == [1, 3] * 4
    assert result.interleave


def test_interleave_falls_back_nearest_its_target():
    pol = MemPolicy(Mode.INTERLEAVE, (0, 2))
    result = plan(pol, cpu=0, ilx=np.arange(6), free=(100, 100, 1, 100))
    # Target 2 is full after one page; its nearest node is 3, although the CPU sits on node 0.
    assert result.nodes.tolist() == [0, 2, 0, 3, 0, 3]
    assert result.intended.tolist() == [0, 2, 0, 2, 0, 2]


def test_interleave_pages_are_served_in_page_order_as_nodes_run_dry():
    pol = MemPolicy(Mode.INTERLEAVE, (0, 1))
    result = plan(pol, ilx=np.arange(4), free=(1, 3, 0, 0))
    assert result.nodes.tolist() == [0, 1, 1, 1]


def test_weighted_interleave_plan_follows_the_weights():
    pol = MemPolicy(Mode.WEIGHTED_INTERLEAVE, (0, 1))
    result = plan(pol, ilx=np.arange(8), weights=[3, 1, 1, 1])
    assert result.nodes.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


def test_planner_does_not_modify_the_free_array():
    free = np.array([1, 1, 1, 1], dtype=np.int64)
    plan(None, n=4, free=free)
    assert free.tolist() == [1, 1, 1, 1]


def test_plan_arrays_are_int16_and_read_only():
    result = plan(MemPolicy(Mode.INTERLEAVE, (0, 1)), n=4)
    assert result.nodes.dtype == np.int16 and result.intended.dtype == np.int16
    with pytest.raises(ValueError):
        result.nodes[0] = 3


def random_policies():
    yield None
    yield MemPolicy(Mode.LOCAL, ())
    for nodes in [(0,), (1, 3), (0, 1, 2, 3)]:
        yield MemPolicy(Mode.PREFERRED, nodes[:1])
        yield MemPolicy(Mode.BIND, nodes)
        yield MemPolicy(Mode.PREFERRED_MANY, nodes)
        yield MemPolicy(Mode.INTERLEAVE, nodes)
        yield MemPolicy(Mode.WEIGHTED_INTERLEAVE, nodes)


@pytest.mark.parametrize("pol", list(random_policies()), ids=policy_text)
def test_planner_never_hands_out_more_frames_than_a_node_has(pol):
    rng = np.random.default_rng(7)
    for _ in range(30):
        free = rng.integers(0, 12, size=4)
        npages = int(rng.integers(1, 30))
        cpu = int(rng.integers(0, 4))
        ilx = rng.integers(0, 1 << 40, size=npages)
        usable = list(pol.nodes) if pol is not None and pol.mode == Mode.BIND else [0, 1, 2, 3]
        if free[usable].sum() < npages:
            expect(errno.ENOMEM, plan, pol, cpu=cpu, ilx=ilx, free=free, weights=[2, 1, 3, 1])
            continue
        result = plan(pol, cpu=cpu, ilx=ilx, free=free, dist=ASYMMETRIC, weights=[2, 1, 3, 1])
        used = np.bincount(result.nodes, minlength=4)
        assert (used <= free).all()
        assert set(result.nodes.tolist()) <= set(usable)
        assert len(result.nodes) == len(result.intended) == npages


def page_by_page(pol, cpu, ilx, free, dist, weights):
    """Oracle: serve one page at a time from the first node of its fallback list with a frame."""
    free = [int(f) for f in free]

    def by_distance(origin, nodes):
        return sorted(nodes, key=lambda n: (n != origin, dist[origin][n], n))

    mode = Mode.LOCAL if pol is None else pol.mode
    targets = interleave_nodes(pol, ilx, weights) if pol is not None and pol.is_interleave else None
    out = []
    for i in range(len(ilx)):
        if mode == Mode.LOCAL:
            order = by_distance(cpu, range(4))
        elif mode == Mode.PREFERRED:
            order = by_distance(pol.nodes[0], range(4))
        elif mode == Mode.BIND:
            order = by_distance(cpu, pol.nodes)
        elif mode == Mode.PREFERRED_MANY:
            rest = [n for n in range(4) if n not in pol.nodes]
            order = by_distance(cpu, pol.nodes) + by_distance(cpu, rest)
        else:
            order = by_distance(int(targets[i]), range(4))
        node = next(n for n in order if free[n] > 0)
        free[node] -= 1
        out.append(node)
    return out


@pytest.mark.parametrize("pol", list(random_policies()), ids=policy_text)
def test_planner_matches_page_by_page_allocation(pol):
    rng = np.random.default_rng(3)
    weights = [2, 1, 3, 1]
    for _ in range(40):
        free = rng.integers(0, 8, size=4)
        npages = int(rng.integers(1, 25))
        cpu = int(rng.integers(0, 4))
        ilx = rng.integers(0, 1 << 30, size=npages)
        usable = list(pol.nodes) if pol is not None and pol.mode == Mode.BIND else [0, 1, 2, 3]
        if free[usable].sum() < npages:
            continue
        result = plan(pol, cpu=cpu, ilx=ilx, free=free, dist=ASYMMETRIC, weights=weights)
        expected = page_by_page(pol, cpu, ilx, free, ASYMMETRIC, weights)
        assert result.nodes.tolist() == expected


# ---------------------------------------------------------------------------------------------
# numastat
# ---------------------------------------------------------------------------------------------


def deltas(result: AllocPlan, cpu: int) -> dict[str, list[int]]:
    return {name: v.tolist() for name, v in result.numastat_deltas(cpu, 4).items()}


def test_numastat_keys_are_the_six_counters_in_file_order():
    result = plan(None, n=1)
    assert list(result.numastat_deltas(0, 4)) == [
        "numa_hit",
        "numa_miss",
        "numa_foreign",
        "interleave_hit",
        "local_node",
        "other_node",
    ]


def test_local_allocations_are_local_hits():
    got = deltas(plan(None, cpu=1, n=5), cpu=1)
    assert got["numa_hit"] == [0, 5, 0, 0]
    assert got["local_node"] == [0, 5, 0, 0]
    assert got["numa_miss"] == got["numa_foreign"] == got["other_node"] == [0, 0, 0, 0]
    assert got["interleave_hit"] == [0, 0, 0, 0]


def test_numastat_foreign_is_charged_to_the_intended_node():
    result = plan(MemPolicy(Mode.PREFERRED, (3,)), cpu=0, n=5, free=(100, 100, 100, 3))
    got = deltas(result, cpu=0)
    assert got["numa_hit"] == [0, 0, 0, 3]
    assert got["numa_miss"] == [0, 0, 2, 0]
    assert got["numa_foreign"] == [0, 0, 0, 2]
    assert got["local_node"] == [0, 0, 0, 0]
    assert got["other_node"] == [0, 0, 2, 3]


def test_bind_fallback_within_its_nodes_is_a_miss():
    result = plan(MemPolicy(Mode.BIND, (0, 3)), cpu=1, n=5, free=(2, 100, 100, 100))
    got = deltas(result, cpu=1)
    assert got["numa_hit"] == [2, 0, 0, 0]
    assert got["numa_miss"] == [0, 0, 0, 3]
    assert got["numa_foreign"] == [3, 0, 0, 0]


def test_interleave_hit_counts_pages_on_their_target():
    pol = MemPolicy(Mode.INTERLEAVE, (0, 2))
    got = deltas(plan(pol, cpu=0, ilx=np.arange(6), free=(100, 100, 1, 100)), cpu=0)
    assert got["interleave_hit"] == [3, 0, 1, 0]
    assert got["numa_hit"] == [3, 0, 1, 0]
    assert got["numa_miss"] == [0, 0, 0, 2]
    assert got["numa_foreign"] == [0, 0, 2, 0]
    assert got["local_node"] == [3, 0, 0, 0]
    assert got["other_node"] == [0, 0, 1, 2]


def test_preferred_many_pages_served_outside_the_set_are_charged_to_the_cpu_node():
    pol = MemPolicy(Mode.PREFERRED_MANY, (2, 3))
    result = plan(pol, cpu=0, n=3, free=(1, 100, 1, 0))
    assert result.nodes.tolist() == [2, 0, 1]
    assert result.intended.tolist() == [2, 0, 0]
    got = deltas(result, cpu=0)
    assert got["numa_hit"] == [1, 0, 1, 0]
    assert got["numa_miss"] == [0, 1, 0, 0]
    assert got["numa_foreign"] == [1, 0, 0, 0]


@pytest.mark.parametrize("pol", list(random_policies()), ids=policy_text)
def test_numastat_each_page_is_one_of_hit_or_miss_and_one_of_local_or_other(pol):
    rng = np.random.default_rng(11)
    for _ in range(20):
        free = rng.integers(0, 10, size=4)
        npages = int(rng.integers(1, 12))
        cpu = int(rng.integers(0, 4))
        usable = list(pol.nodes) if pol is not None and pol.mode == Mode.BIND else [0, 1, 2, 3]
        if free[usable].sum() < npages:
            continue
        result = plan(pol, cpu=cpu, ilx=rng.integers(0, 1000, size=npages), free=free)
        got = result.numastat_deltas(cpu, 4)
        assert (got["numa_hit"] + got["numa_miss"] == np.bincount(result.nodes, minlength=4)).all()
        assert (got["local_node"] + got["other_node"] == got["numa_hit"] + got["numa_miss"]).all()
        assert got["numa_miss"].sum() == got["numa_foreign"].sum()
        assert (got["interleave_hit"] <= got["numa_hit"]).all()
        if pol is None or not pol.is_interleave:
            assert got["interleave_hit"].sum() == 0
        assert all(v.dtype == np.int64 and v.shape == (4,) for v in got.values())
