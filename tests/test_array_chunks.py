"""A sweep larger than SLURM's MaxArraySize is submitted as several arrays (SPEC §7): the chunks and
their throttles, as the pure function the SLURM launcher uses (no SLURM here; tests/test_slurm.py
submits real ones)."""

from __future__ import annotations

import pytest

from hydra_plugins.coupled_net_launcher.launcher import chunk_plan


@pytest.mark.parametrize("n, limit, parallelism, expected", [
    (3, 4, 3, [(0, 3, 3, None)]),                                        # limit - 1 jobs: one array
    (4, 4, 3, [(0, 4, 3, None)]),                                        # limit jobs: still one
    (5, 4, 3, [(0, 4, 2, None), (4, 5, 1, None)]),                       # limit + 1: two, 2 + 1 lanes
    (9, 4, 3, [(0, 4, 1, None), (4, 8, 1, None), (8, 9, 1, None)]),
    (9, 4, 5, [(0, 4, 2, None), (4, 8, 2, None), (8, 9, 1, None)]),      # 5 tasks over 3 lanes: 2 + 2 + 1
    (13, 4, 2, [(0, 4, 1, None), (4, 8, 1, None), (8, 12, 1, 0), (12, 13, 1, 1)]),  # 2 lanes: waits on its lane
    (3, 0, 2, [(0, 1, 1, None), (1, 2, 1, None), (2, 3, 1, 0)]),         # MaxArraySize=0: one job per chunk
    (5, None, 3, [(0, 5, 3, None)]),                                     # MaxArraySize unknown: one array
])
def test_chunk_plan_by_hand(n, limit, parallelism, expected):
    assert chunk_plan(n, limit, parallelism) == expected


@pytest.mark.parametrize("limit", [1, 2, 5, 1001])
@pytest.mark.parametrize("parallelism", [1, 2, 3, 7])
def test_chunks_never_exceed_max_array_size_and_lane_throttles_add_up_to_array_parallelism(limit, parallelism):
    for n in sorted({limit - 1, limit, limit + 1, 2 * limit - 1, 2 * limit, 2 * limit + 1, 5 * limit + 1} - {0}):
        plan = chunk_plan(n, limit, parallelism)
        assert [start for start, *_ in plan] == [0] + [stop for _, stop, *_ in plan[:-1]], (n, plan)  # contiguous
        assert plan[-1][1] == n
        assert all(1 <= stop - start <= limit for start, stop, *_ in plan), (n, plan)  # indices 0 … limit-1
        assert len(plan) == -(-n // limit)  # as few arrays as the limit allows
        lanes = [throttle for *_, throttle, after in plan if after is None]  # the chunks that start at once
        assert lanes == [throttle for _, _, throttle, _ in plan[:len(lanes)]]
        assert sum(lanes) == parallelism, (n, plan)
        assert all(t >= 1 for _, _, t, _ in plan)
        for k, (_, _, throttle, after) in enumerate(plan[len(lanes):], start=len(lanes)):
            # a later chunk waits for the one before it in its lane and takes that lane's throttle
            assert after == k - len(lanes) and throttle == plan[after][2], (n, plan)
