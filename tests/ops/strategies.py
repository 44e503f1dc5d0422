"""Hypothesis strategies for op inputs: odd shapes with batch dim 0."""

from hypothesis import strategies as st

from opsutil import DTYPES

shapes = st.tuples(
    st.integers(1, 4), st.lists(st.integers(1, 37), min_size=0, max_size=3)
).map(lambda bt: (bt[0], *bt[1]))
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)
