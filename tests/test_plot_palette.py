"""The learning-curve plot tells every group apart (coupled_net.plots.curve_grid, a matplotlib Figure):
the colours read back from the drawn matplotlib lines are pairwise different and far apart, with 3
groups and with 12 (where each group also gets its own marker, on its lines as in the figure's one
legend). viridis, the earlier palette, put 12 groups 0.07 apart in RGB."""

from __future__ import annotations

import itertools
import math

import matplotlib
import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgb

from coupled_net.plots import curve_grid

matplotlib.use("Agg")
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c"]  # matplotlib's tab10, its first three


def curves(n: int) -> pd.DataFrame:
    """n groups, one facet, two epochs; group g's line starts at 40 + 2g before KE and 39 + 2g after,
    so each drawn line says which group it is."""
    rows = [{"facet": "small_cnn / synthetic_letters", "group": f"alpha={g} (n=1)", "alpha": g, "epoch": epoch,
             "when": when, "top1": start + 2 * g + epoch}
            for g in range(n) for epoch in (1, 2) for when, start in (("before KE", 39.0), ("after KE", 38.0))]
    return pd.DataFrame(rows)


def drawn(n: int):
    """(group, colour, marker) of every line with data in the plot of n groups, and the legend's handles."""
    fig = curve_grid(curves(n), single=True)
    lines = [line for ax in fig.axes for line in ax.lines if len(line.get_xdata())]
    out = []
    for line in lines:
        start = float(line.get_ydata()[0]) - 1  # epoch 1
        group = int((start - 39) // 2) if line.get_linestyle() == "-" else int((start - 38) // 2)
        out.append((group, to_hex(line.get_color()), line.get_marker()))
    assert len(fig.legends) == 1  # one legend for the figure
    handles = fig.legends[0].legend_handles
    return out, handles


def distance(a: str, b: str) -> float:
    return math.dist(to_rgb(a), to_rgb(b))


def test_three_groups_get_tab10_s_first_three_colours_before_and_after_ke():
    lines, _ = drawn(3)
    assert len(lines) == 6  # a solid and a dashed line per group
    assert sorted({(g, c) for g, c, _ in lines}) == [(0, TAB10[0]), (1, TAB10[1]), (2, TAB10[2])]
    assert all(m in ("None", "", None) for _, _, m in lines)  # no markers needed below 11 groups


# the least RGB distance between two groups' colours; viridis gives 0.089 at 10, 0.074 at 12, 0.035 at 25
@pytest.mark.parametrize("n, apart", [(10, 0.2), (12, 0.1), (25, 0.045)])
def test_every_group_s_colour_is_its_own_and_far_from_the_others(n, apart):
    lines, handles = drawn(n)
    colour = {}
    for group, c, _ in lines:
        assert colour.setdefault(group, c) == c, f"group {group} drawn in two colours"
    assert sorted(colour) == list(range(n))
    closest = min(distance(a, b) for a, b in itertools.combinations(colour.values(), 2))
    assert closest > apart, closest
    if n > 10:  # past tab10 a marker per group too, in the legend as on the lines
        marker = {g: m for g, _, m in lines}
        assert all(m not in ("None", "", None) for m in marker.values())
        assert len(set(marker.values())) >= 8, marker
        legend = {to_hex(h.get_color()): h.get_marker() for h in handles if to_hex(h.get_color()) in colour.values()}
        assert legend == {colour[g]: marker[g] for g in range(n)}
