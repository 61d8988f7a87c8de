"""The sort-based set and scatter helpers agree with numpy on any input."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numaemu import arrayops

indices = hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 63))


@given(indices)
def test_unique_matches_numpy(a):
    assert np.array_equal(arrayops.unique(a), np.unique(a))
    assert arrayops.unique(np.unique(a)).tolist() == np.unique(a).tolist()


@given(hnp.arrays(np.int16, st.integers(0, 300), elements=st.integers(0, 15)))
def test_values_matches_numpy(a):
    assert arrayops.values(a) == np.unique(a).tolist()


@given(indices, st.integers(-3, 3))
def test_add_at_with_a_scalar_matches_numpy(idx, value):
    ours, theirs = np.zeros(64, dtype=np.int32), np.zeros(64, dtype=np.int32)
    arrayops.add_at(ours, idx, value)
    np.add.at(theirs, idx, value)
    assert np.array_equal(ours, theirs)
    arrayops.subtract_at(ours, idx, value)
    assert not ours.any()


@given(indices.flatmap(lambda idx: st.tuples(
    st.just(idx), hnp.arrays(np.int64, len(idx), elements=st.integers(-5, 5)))))
def test_add_at_with_one_value_per_index_matches_numpy(args):
    idx, vals = args
    ours, theirs = np.zeros(64, dtype=np.int32), np.zeros(64, dtype=np.int32)
    arrayops.add_at(ours, idx, vals)
    np.add.at(theirs, idx, vals)
    assert np.array_equal(ours, theirs)
    arrayops.subtract_at(ours, idx, vals)
    np.subtract.at(theirs, idx, vals)
    assert np.array_equal(ours, theirs)


@given(indices, hnp.arrays(np.int64, st.integers(0, 20), elements=st.integers(0, 63)))
def test_isin_matches_numpy(a, members):
    assert np.array_equal(arrayops.isin(a, members), np.isin(a, members))
    assert np.array_equal(arrayops.isin(a, members.tolist()), np.isin(a, members))
