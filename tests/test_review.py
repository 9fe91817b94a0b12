"""coupled_net.review and the summary files, on run directories written by hand with known numbers:
every expected value is computed here, by hand or with scipy, not by the code under test."""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest
from scipy import stats

from coupled_net import review
from coupled_net.plots import alpha_plot_frame, curve_frame, curve_stats, delta_plot_frame
from coupled_net.report import write_summary
from helpers import make_run

# test top-1 per (alpha, seed): alpha 4 has an extra seed (4) that alpha 0 lacks; alpha 8 has one run
TOP1 = {(0, 1): 80.0, (0, 2): 82.0, (0, 3): 78.5,
        (4, 1): 79.0, (4, 2): 81.5, (4, 3): 77.0, (4, 4): 90.0,
        (8, 1): 75.0}
# (val_acc, ke_val_acc, epoch_time_s, ke_eval_time_s) per epoch; best epoch 2
EPOCHS = ((50.0, 49.0, 10.0, 1.0), (60.0, 58.0, 10.0, 1.0), (70.0, 70.5, 20.0, 2.0))


def t_ci(values):
    """The t-based 95 % CI of the mean, from scipy's t quantile."""
    n = len(values)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return statistics.mean(values) - half, statistics.mean(values) + half


@pytest.fixture
def sweep(tmp_path):
    dirs = {}
    for (alpha, seed), top1 in TOP1.items():
        # alpha=4's KE loses `seed` more points at epoch 2, so per-run ke_drop differs by seed
        epochs = [EPOCHS[0], (60.0, 58.0 - (seed if alpha == 4 else 0), 10.0, 1.0), EPOCHS[2]]
        dirs[alpha, seed] = make_run(tmp_path / "sweep" / f"coupling.alpha={alpha},seed={seed}", test_top1=top1,
                                     epochs=epochs, best_epoch=2, coupling__alpha=alpha, seed=seed)
    return tmp_path / "sweep", dirs


def row(frame, **where):
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        mask &= frame[key.replace("__", ".")] == value
    assert mask.sum() == 1, (where, frame)
    return frame[mask].iloc[0]


def test_runs_is_numeric_one_row_per_run_with_every_config_key_and_an_absolute_run_dir(sweep, monkeypatch):
    root, dirs = sweep
    monkeypatch.chdir(root.parent)
    runs = review.runs("sweep")  # relative, as typed
    assert len(runs) == len(TOP1)
    assert set(runs["run_dir"]) == {str(d) for d in dirs.values()}  # absolute
    for column in ("coupling.alpha", "seed", "test_top1", "ke_drop_mean", "ke_overhead"):
        assert pd.api.types.is_numeric_dtype(runs[column]), column
    assert set(runs["optimizer.lr"]) == {0.05} and set(runs["coupling.mode"]) == {"copy"}


def test_ke_drop_and_ke_overhead_per_run_match_the_epochs_by_hand(sweep):
    runs = review.runs(sweep[0])
    r = row(runs, coupling__alpha=4, seed=3)
    drops = [50.0 - 49.0, 60.0 - (58.0 - 3), 70.0 - 70.5]  # val_acc - ke_val_acc per epoch
    assert r["ke_drop_mean"] == pytest.approx(sum(drops) / 3)
    assert r["ke_drop_best"] == pytest.approx(5.0)  # epoch 2, the best one
    # timings: epochs 2 and 3 (the first carries the warm-up); the first on its own
    assert r["ke_overhead"] == pytest.approx(((1 + 2) / 2) / ((10 + 20) / 2))
    assert r["epoch_time_s_mean"] == pytest.approx(30 / 2) and r["first_epoch_time_s"] == 10
    assert r["ke_eval_time_s_mean"] == pytest.approx(3 / 2)


def test_summarize_gives_mean_sample_std_n_and_the_t_ci_per_group(sweep):
    groups = review.summarize(review.runs(sweep[0]))
    assert list(groups["coupling.alpha"]) == [0, 4, 8]  # sorted by alpha, numbers not strings
    values = [79.0, 81.5, 77.0, 90.0]
    g = row(groups, coupling__alpha=4)
    assert (g["n"], g["test_top1_n"], g["seeds"]) == (4, 4, [1, 2, 3, 4])
    assert g["test_top1_mean"] == pytest.approx(81.875)
    assert g["test_top1_std"] == pytest.approx(statistics.stdev(values))
    assert (g["test_top1_ci_low"], g["test_top1_ci_high"]) == pytest.approx(t_ci(values))
    per_run_drop = [(1 + (2 + s) - 0.5) / 3 for s in (1, 2, 3, 4)]
    assert g["ke_drop_mean_mean"] == pytest.approx(statistics.mean(per_run_drop))
    assert g["ke_drop_best_mean"] == pytest.approx(statistics.mean([2 + s for s in (1, 2, 3, 4)]))
    assert g["ke_overhead_mean"] == pytest.approx(0.1)
    one = row(groups, coupling__alpha=8)  # n=1: a mean, no spread, no interval
    assert (one["n"], one["test_top1_mean"]) == (1, 75.0)
    assert math.isnan(one["test_top1_std"]) and math.isnan(one["test_top1_ci_low"])


def test_compare_pairs_by_seed_against_alpha_0_and_lists_the_unpaired_run(sweep):
    root, dirs = sweep
    deltas = review.compare(review.runs(root))
    assert list(deltas["coupling.alpha"]) == [4, 8] and set(deltas["metric"]) == {"test_top1"}
    d = row(deltas, coupling__alpha=4)
    this, base = [79.0, 81.5, 77.0], [80.0, 82.0, 78.5]  # seeds 1-3; seed 4 has no alpha=0 run
    diffs = [a - b for a, b in zip(this, base)]
    assert d["n_pairs"] == 3
    assert d["delta_mean"] == pytest.approx(-1.0) and d["delta_std"] == pytest.approx(0.5)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(t_ci(diffs))
    assert d["p_value"] == pytest.approx(stats.ttest_rel(this, base).pvalue)
    assert math.isnan(d["wilcoxon_p"])  # fewer than 6 pairs
    assert (d["baseline_mean"], d["mean"]) == pytest.approx((statistics.mean(base), statistics.mean(this)))
    assert (d["n_unpaired"], d["unpaired"]) == (1, [str(dirs[4, 4])])
    one = row(deltas, coupling__alpha=8)  # one pair: a difference, no interval, no test
    assert (one["n_pairs"], one["delta_mean"]) == (1, -5.0)
    assert math.isnan(one["ci_low"]) and math.isnan(one["p_value"])
    # alpha=0's seeds 2 and 3 have no alpha=8 partner: reported on that comparison
    assert sorted(one["unpaired"]) == sorted([str(dirs[0, 2]), str(dirs[0, 3])])


def test_compare_adds_the_wilcoxon_test_from_six_pairs(tmp_path):
    base = [70.0, 71.0, 72.5, 69.0, 70.5, 73.0]
    this = [69.0, 70.5, 70.0, 69.5, 68.0, 71.5]
    for seed, (a, b) in enumerate(zip(base, this), start=1):
        make_run(tmp_path / f"a0s{seed}", test_top1=a, seed=seed)
        make_run(tmp_path / f"a2s{seed}", test_top1=b, seed=seed, coupling__alpha=2)
    d = review.compare(review.runs(tmp_path)).iloc[0]
    assert d["n_pairs"] == 6
    assert d["wilcoxon_p"] == pytest.approx(stats.wilcoxon(this, base).pvalue)
    assert d["p_value"] == pytest.approx(stats.ttest_rel(this, base).pvalue)


def test_copy_and_mean_are_separate_groups_lines_and_comparisons(tmp_path):
    top1 = {("copy", 0): (80.0, 81.0), ("copy", 4): (79.0, 80.5), ("mean", 0): (60.0, 61.0), ("mean", 4): (58.0, 60.0)}
    for (mode, alpha), values in top1.items():
        for seed, value in enumerate(values, start=1):
            make_run(tmp_path / f"{mode}{alpha}s{seed}", test_top1=value, coupling__mode=mode, coupling__alpha=alpha,
                     seed=seed)
    runs = review.runs(tmp_path)
    assert review.group_keys(runs) == ["model.name", "dataset.name", "coupling.alpha", "coupling.mode"]
    groups = review.summarize(runs)
    assert len(groups) == 4
    assert row(groups, coupling__mode="mean", coupling__alpha=4)["test_top1_mean"] == pytest.approx(59.0)
    deltas = review.compare(runs)  # mean at alpha 4 against mean at alpha 0, never against copy
    assert row(deltas, coupling__mode="mean")["delta_mean"] == pytest.approx(((58 - 60) + (60 - 61)) / 2)
    assert row(deltas, coupling__mode="copy")["delta_mean"] == pytest.approx(((79 - 80) + (80.5 - 81)) / 2)
    plotted = alpha_plot_frame(groups, review.group_keys(runs))  # one row per group, one line per mode
    assert sorted(zip(plotted["label"], plotted["alpha"], plotted["mean"])) == [
        ("mode=copy (n=2)", 0, 80.5), ("mode=copy (n=2)", 4, 79.75),
        ("mode=mean (n=2)", 0, 60.5), ("mode=mean (n=2)", 4, 59.0)]
    assert set(plotted["facet"]) == {"small_cnn / synthetic_letters"}
    delta = delta_plot_frame(deltas, review.group_keys(runs), groups)
    assert sorted(zip(delta["label"], delta["mean"])) == [("mode=copy (n=2)", -0.75), ("mode=mean (n=2)", -1.5)]
    by_mode = review.compare(runs, baseline={"coupling.mode": "copy"})  # mean against copy, alpha by alpha
    assert sorted(zip(by_mode["coupling.alpha"], by_mode["coupling.mode"], by_mode["delta_mean"])) == [
        (0, "mean", ((60 - 80) + (61 - 81)) / 2), (4, "mean", ((58 - 79) + (60 - 80.5)) / 2)]
    curves = curve_frame(review.epochs(runs), groups, review.group_keys(runs))
    assert curves.groupby("group").size().to_dict() == {  # before + after KE, 2 seeds, 1 epoch
        f"alpha={a}, mode={m} (n=2)": 4 for m in ("copy", "mean") for a in (0, 4)}


def test_a_label_or_another_lr_splits_groups_and_a_baseline_must_match_every_other_key(tmp_path):
    make_run(tmp_path / "a0", test_top1=80.0)
    make_run(tmp_path / "a4", test_top1=78.0, coupling__alpha=4)
    make_run(tmp_path / "a4lr", test_top1=70.0, coupling__alpha=4, optimizer__lr=0.01)  # no alpha=0 at lr 0.01
    make_run(tmp_path / "a4x", test_top1=77.0, coupling__alpha=4, labels={"note": "x"})  # no alpha=0 labelled x
    runs = review.runs(tmp_path)
    assert review.group_keys(runs) == ["model.name", "dataset.name", "coupling.alpha", "note", "optimizer.lr"]
    assert len(review.summarize(runs)) == 4
    deltas = review.compare(runs)
    paired = deltas[deltas["n_pairs"] == 1]
    assert len(paired) == 1 and paired.iloc[0]["delta_mean"] == -2.0
    lonely = deltas[deltas["n_pairs"] == 0]
    assert sorted(u for us in lonely["unpaired"] for u in us) == sorted([str(tmp_path / "a4lr"), str(tmp_path / "a4x")])


def test_timings_are_never_averaged_across_device_types(tmp_path):
    make_run(tmp_path / "s1", seed=1, epochs=((40.0, 39.0, 10.0, 1.0),), device="cpu (A)")
    make_run(tmp_path / "s2", seed=2, epochs=((40.0, 39.0, 2.0, 0.5),), device="NVIDIA H100")
    make_run(tmp_path / "s3", seed=3, epochs=((40.0, 39.0, 4.0, 1.0),), device="NVIDIA H100")
    runs = review.runs(tmp_path)
    g = review.summarize(runs).iloc[0]
    assert g["n"] == 3 and g["test_top1_n"] == 3  # accuracy pools the seeds
    assert pd.isna(g["device"]) and math.isnan(g["epoch_time_s_mean_mean"])  # timings do not
    t = review.timings(runs).set_index("device")
    assert t.loc["NVIDIA H100", "epoch_time_s_mean_mean"] == pytest.approx(3.0)
    assert t.loc["NVIDIA H100", "ke_overhead_mean"] == pytest.approx((0.25 + 0.25) / 2)
    assert t.loc["cpu (A)", "epoch_time_s_mean_mean"] == pytest.approx(10.0)
    s = write_summary([tmp_path])
    assert "## Timings per device (groups that ran on several)" in s.markdown
    cells = [c.strip() for c in s.headline.splitlines()[4].strip("|").split("|")]
    assert cells[-2:] == ["mixed", ""]  # epoch s, KE cost: per device, in the table below


def test_packed_runs_timings_are_never_pooled_with_runs_that_had_the_gpu_alone(tmp_path):
    h200 = {"device": "NVIDIA H200"}
    make_run(tmp_path / "s1", seed=1, epochs=((40.0, 39.0, 2.0, 0.5),), results={"provenance": h200})
    make_run(tmp_path / "s2", seed=2, epochs=((40.0, 39.0, 5.0, 0.5),),
             results={"provenance": {**h200, "sharing": {"shared_by": 4, "packed_in": "local"}}})
    make_run(tmp_path / "s3", seed=3, epochs=((40.0, 39.0, 7.0, 1.0),),
             results={"provenance": {**h200, "sharing": {"shared_by": 4, "packed_in": "slurm task"}}})
    runs = review.runs(tmp_path)
    assert list(runs.sort_values("seed")["shared_by"]) == [1, 4, 4]
    g = review.summarize(runs).iloc[0]
    assert g["test_top1_n"] == 3 and pd.isna(g["device"]) and math.isnan(g["epoch_time_s_mean_mean"])
    t = review.timings(runs).set_index("device")
    assert list(t.index) == ["NVIDIA H200", "NVIDIA H200, shared by 4 runs"]
    assert t.loc["NVIDIA H200", "epoch_time_s_mean_mean"] == pytest.approx(2.0)
    assert t.loc["NVIDIA H200, shared by 4 runs", "epoch_time_s_mean_mean"] == pytest.approx(6.0)
    assert t.loc["NVIDIA H200, shared by 4 runs", "n"] == 2


def test_epochs_is_the_long_form_with_ke_drop_and_the_runs_config(sweep):
    runs = review.runs(sweep[0])
    e = review.epochs(runs)
    assert len(e) == 3 * len(TOP1)
    r = e[(e["coupling.alpha"] == 4) & (e["seed"] == 2) & (e["epoch"] == 2)].iloc[0]
    assert (r["val_acc"], r["ke_val_acc"], r["ke_drop"]) == (60.0, 56.0, 4.0)
    assert set(e["run_dir"]) == set(runs["run_dir"])


def test_the_summary_files_hold_the_frames_and_a_headline_under_120_characters(sweep):
    root, dirs = sweep
    make_run(root / "failed", status="failed", test_top1=None, coupling__alpha=4, seed=9)
    s = write_summary([root])
    for name in ("summary.csv", "summary_groups.csv", "summary_delta.csv", "summary.md", "summary.tex",
                 "summary_test_top1_vs_alpha.png", "summary_delta_vs_alpha.png", "summary_learning_curves.png"):
        assert (root / name).is_file(), name
    groups = pd.read_csv(root / "summary_groups.csv")
    assert list(groups.columns[:6]) == ["model.name", "dataset.name", "coupling.alpha", "n", "seeds", "device"]
    assert list(groups.columns[6:11]) == ["test_top1_mean", "test_top1_std", "test_top1_n", "test_top1_ci_low",
                                          "test_top1_ci_high"]
    assert groups["test_top1_mean"].tolist() == pytest.approx([(80.0 + 82.0 + 78.5) / 3, 81.875, 75.0])
    delta = pd.read_csv(root / "summary_delta.csv")
    assert list(delta.columns[3:]) == ["metric", "n_pairs", "baseline_mean", "mean", "delta_mean", "delta_std",
                                       "ci_low", "ci_high", "p_value", "wilcoxon_p", "n_unpaired", "unpaired"]
    assert delta.loc[(delta["coupling.alpha"] == 4) & (delta["metric"] == "test_top1"), "unpaired"].tolist() == [
        str(dirs[4, 4])]
    headline = s.markdown.split("\n\n## ")[0]
    table = [line for line in headline.splitlines() if line.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "alpha", "n", "test top-1", "Δ vs alpha=0 [95 % CI]", "p", "KE drop", "epoch s", "KE cost"]
    lo, hi = t_ci([79.0 - 80.0, 81.5 - 82.0, 77.0 - 78.5])
    p = stats.ttest_rel([79.0, 81.5, 77.0], [80.0, 82.0, 78.5]).pvalue
    drops = [(1 + (2 + s) - 0.5) / 3 for s in (1, 2, 3, 4)]
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells == ["4", "4", f"81.88 ± {statistics.stdev([79.0, 81.5, 77.0, 90.0]):.2f}",
                     f"-1.00 [{lo:+.2f}, {hi:+.2f}]", f"{p:.3f}",
                     f"{statistics.mean(drops):.2f} ± {statistics.stdev(drops):.2f}", "15.0", "10.0 %"]  # (10 + 20) / 2
    assert max(len(line) for line in headline.splitlines()) <= 120
    assert "## Runs not in the aggregate" in s.markdown and str(root / "failed") in s.markdown
    assert f"not in the table: {root / 'failed'} (failed)" in s.headline


def test_summary_tex_is_a_booktabs_table_with_caption_label_and_pm(sweep):
    root, _ = sweep
    write_summary([root])
    tex = (root / "summary.tex").read_text()
    lines = tex.splitlines()
    assert lines[0] == r"\begin{table}[t]" and lines[-1] == r"\end{table}"
    for needle in (r"\centering", r"\caption{", r"\label{tab:coupled-net-summary}", r"\begin{tabular}{lrrrrrrr}",
                   r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert sum(needle in line for line in lines) == 1, needle
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert len(body) == 3 and all(line.count("&") == 7 and line.endswith(r"\\") for line in body)
    assert r"81.88 $\pm$ " in tex and "±" not in tex and "Δ" not in tex
    assert r"$-$1.00 [" in tex  # a minus sign, not a hyphen
    assert r"small\_cnn on synthetic\_letters" in tex  # escaped


def test_the_readme_notebook_example_runs_as_written(sweep):
    from helpers import REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("**In a notebook**")[1].split("```python\n")[1].split("```")[0]
    assert len(block.strip().splitlines()) <= 5
    namespace = {}
    exec(block.replace('"outputs/multirun/2026-11-25/10-00-00"', repr(str(sweep[0]))), namespace)  # noqa: S102
    assert len(namespace["runs"]) == len(TOP1) and len(namespace["curves"]) == 3 * len(TOP1)


def test_torchvision_runs_are_grouped_by_their_arch_as_the_model_name_without_a_second_column(tmp_path):
    # model=torchvision keeps no model.name in its config: the review names the model by its arch
    # (as results.json does), and model.arch, which says the same, is not a group column of its own
    for arch, alpha, seed, top1 in [("mobilenet_v3_small", 0, 1, 30.0), ("mobilenet_v3_small", 4, 1, 28.0),
                                    ("regnet_y_400mf", 0, 1, 70.0), ("regnet_y_400mf", 4, 1, 71.0)]:
        run_dir = make_run(tmp_path / f"{arch}-{alpha}", test_top1=top1, model__arch=arch, coupling__alpha=alpha,
                           seed=seed, model___target_="coupled_net.models.torchvision_model")
        res = json.loads((run_dir / "results.json").read_text())
        del res["identity"]["model.name"]
        res["model"] = arch
        (run_dir / "results.json").write_text(json.dumps(res))
    frame = review.runs(tmp_path)
    assert sorted(frame["model.name"]) == ["mobilenet_v3_small"] * 2 + ["regnet_y_400mf"] * 2
    assert review.group_keys(frame) == ["model.name", "dataset.name", "coupling.alpha"]
    table = review.summarize(frame)
    assert list(zip(table["model.name"], table["coupling.alpha"], table["test_top1_mean"])) == [
        ("mobilenet_v3_small", 0, 30.0), ("mobilenet_v3_small", 4, 28.0), ("regnet_y_400mf", 0, 70.0),
        ("regnet_y_400mf", 4, 71.0)]


# ---- pairing, group order and the Δ's sign in every written format ---------------------------------

def test_compare_pairs_by_seed_when_the_baseline_runs_come_in_another_order_and_miss_a_middle_seed(tmp_path):
    # alpha=0 has seeds 3 then 1 (by path), no seed 2; alpha=2 has seeds 1, 2, 3 in order
    base = {3: 90.0, 1: 70.0}
    this = {1: 71.0, 2: 50.0, 3: 88.0}
    for i, (seed, top1) in enumerate(base.items()):
        make_run(tmp_path / f"a0-{i}", test_top1=top1, seed=seed)
    for seed, top1 in this.items():
        make_run(tmp_path / f"a2-s{seed}", test_top1=top1, seed=seed, coupling__alpha=2)
    d = review.compare(review.runs(tmp_path)).iloc[0]
    diffs = [71.0 - 70.0, 88.0 - 90.0]  # seed 1: +1, seed 3: -2
    assert d["n_pairs"] == 2
    assert d["delta_mean"] == pytest.approx(-0.5)
    assert d["delta_std"] == pytest.approx(statistics.stdev(diffs))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(t_ci(diffs))
    assert d["p_value"] == pytest.approx(stats.ttest_rel([71.0, 88.0], [70.0, 90.0]).pvalue)
    assert (d["baseline_mean"], d["mean"]) == pytest.approx((80.0, 79.5))
    assert (d["n_unpaired"], d["unpaired"]) == (1, [str(tmp_path / "a2-s2")])


def test_groups_are_ordered_by_alpha_as_numbers_in_every_table(tmp_path):
    for alpha, top1 in ((16, 60.0), (0, 80.0), (2, 78.0)):
        make_run(tmp_path / f"alpha{alpha}", test_top1=top1, coupling__alpha=alpha)
    s = write_summary([tmp_path])
    assert list(s.groups["coupling.alpha"]) == [0, 2, 16]
    assert list(s.deltas.loc[s.deltas["metric"] == "test_top1", "coupling.alpha"]) == [2, 16]
    assert list(pd.read_csv(tmp_path / "summary_groups.csv")["coupling.alpha"]) == [0, 2, 16]
    headline = s.markdown.split("\n\n## ")[0]
    rows = [line for line in headline.splitlines() if line.startswith("|")][2:]
    assert [r.strip("|").split("|")[0].strip() for r in rows] == ["0", "2", "16"]
    tex = (tmp_path / "summary.tex").read_text().splitlines()
    body = tex[tex.index(r"\midrule") + 1:tex.index(r"\bottomrule")]
    assert [line.split("&")[0].strip() for line in body] == ["0", "2", "16"]


def md_rows(markdown: str, section: str) -> list[dict]:
    """The body rows of the first table after the heading `section` of a Markdown text, by column."""
    lines = markdown.split(section, 1)[1].split("\n\n")[1].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_the_delta_keeps_its_sign_in_every_format_written(tmp_path):
    # (test top-1, val top-1) by (alpha, seed): alpha 2 gains, alpha 4 loses, seed by seed
    top1 = {(0, 1): (80.0, 40.0), (0, 2): (82.0, 41.0), (2, 1): (81.0, 41.0), (2, 2): (84.0, 41.0),
            (4, 1): (78.0, 39.0), (4, 2): (79.0, 39.0)}
    for (alpha, seed), (test, val) in top1.items():
        make_run(tmp_path / f"a{alpha}s{seed}", test_top1=test, val_top1=val, coupling__alpha=alpha, seed=seed)

    def text(mean, diffs):
        lo, hi = t_ci(diffs)
        assert lo < 0 < hi  # every interval crosses zero: signs on both sides
        return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    up, down = text(1.5, [1.0, 2.0]), text(-2.5, [-2.0, -3.0])                # test top-1
    val_up, val_down = text(0.5, [1.0, 0.0]), text(-1.5, [-1.0, -2.0])        # val top-1
    assert (up, down) == ("+1.50 [-4.85, +7.85]", "-2.50 [-8.85, +3.85]")
    s = write_summary([tmp_path])

    # summary_delta.csv: the numbers with their signs
    csv = pd.read_csv(tmp_path / "summary_delta.csv")
    by = {(r["coupling.alpha"], r["metric"]): r for _, r in csv.iterrows()}
    for (alpha, metric), (mean, diffs) in {(2, "test_top1"): (1.5, [1.0, 2.0]), (4, "test_top1"): (-2.5, [-2.0, -3.0]),
                                           (2, "val_top1"): (0.5, [1.0, 0.0]), (4, "val_top1"): (-1.5, [-1.0, -2.0])
                                           }.items():
        r = by[alpha, metric]
        assert (r["delta_mean"], r["ci_low"], r["ci_high"]) == pytest.approx((mean, *t_ci(diffs))), (alpha, metric)

    # summary.md's headline table and the terminal's (the same table)
    for written in (s.markdown, s.headline):
        rows = md_rows(written, "## What coupling costs")
        assert [(r["alpha"], r["Δ vs alpha=0 [95 % CI]"]) for r in rows] == [("0", "baseline"), ("2", up), ("4", down)]

    # summary.md's full table of paired differences
    full = md_rows(s.markdown, "## Paired differences vs alpha=0 (by seed)")
    assert [(r["alpha"], r["metric"], r["Δ [95 % CI]"]) for r in full] == [
        ("2", "test_top1", up), ("2", "val_top1", val_up), ("4", "test_top1", down), ("4", "val_top1", val_down)]

    # summary.tex: a real minus sign, and the plus kept
    tex = (tmp_path / "summary.tex").read_text().splitlines()
    body = tex[tex.index(r"\midrule") + 1:tex.index(r"\bottomrule")]
    assert [line.split("&")[3].strip() for line in body] == [
        "baseline", r"+1.50 [$-$4.85, +7.85]", r"$-$2.50 [$-$8.85, +3.85]"]

    # the delta plot's points
    delta = delta_plot_frame(s.deltas, s.keys, s.groups)
    assert sorted(zip(delta["alpha"], delta["mean"])) == [(2, pytest.approx(1.5)), (4, pytest.approx(-2.5))]


def test_checkpoint_time_is_a_timing_of_the_review_averaged_over_the_epochs_that_recorded_it(tmp_path):
    # run 1: a first epoch (9 s: its warm-up, not in the mean), 0.5 s, 1.5 s and an epoch restored after a
    # kill (unknown); run 2: one epoch, 2.0 s
    make_run(tmp_path / "s" / "a", epochs=((50.0, 49.0, 10.0, 1.0, 9.0), (50.0, 49.0, 10.0, 1.0, 0.5),
                                          (60.0, 58.0, 10.0, 1.0, 1.5),
                                          (61.0, 60.0, 10.0, 1.0, None)), best_epoch=2, seed=1)
    make_run(tmp_path / "s" / "b", epochs=((50.0, 49.0, 10.0, 1.0, 2.0),), best_epoch=1, seed=2)
    runs = review.runs(tmp_path / "s")
    assert sorted(runs["checkpoint_time_s_mean"]) == [pytest.approx(1.0), pytest.approx(2.0)]
    group = review.summarize(runs).iloc[0]
    assert group["checkpoint_time_s_mean_mean"] == pytest.approx(1.5)
    write_summary([tmp_path / "s"], tmp_path / "out")
    table = (tmp_path / "out" / "summary.md").read_text()
    header = next(line for line in table.splitlines() if "ckpt s" in line)
    cells = [c.strip() for c in header.strip("|").split("|")]
    values = next(line for line in table.splitlines()[table.splitlines().index(header) + 2:])
    assert [c.strip() for c in values.strip("|").split("|")][cells.index("ckpt s")] == "1.50"


def test_the_first_run_of_a_process_paying_the_warm_up_shows_the_same_epoch_time_as_equal_runs(tmp_path):
    # README line 1's sweep runs in one process: only its first run's first epoch carries the warm-up
    # (14.3 s against 6.0 and 5.0 s); every run's other epochs took the same time
    for alpha in (0, 2, 4):
        for seed in (1, 2):
            first = 14.3 if (alpha, seed) == (0, 1) else 6.5
            make_run(tmp_path / "s" / f"a{alpha}_s{seed}", epochs=((50.0, 49.0, first, 0.5), (60.0, 58.0, 6.0, 0.5),
                                                                   (61.0, 60.0, 5.0, 0.5)),
                     best_epoch=3, coupling__alpha=alpha, seed=seed, test_top1=50.0 + seed)
    s = write_summary([tmp_path / "s"], tmp_path / "out")
    headline = s.markdown.split("\n\n## ")[0]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in headline.splitlines() if line.startswith("|")]
    epoch_s, cost = table[0].index("epoch s"), table[0].index("KE cost")
    assert [(r[0], r[epoch_s], r[cost]) for r in table[2:]] == [("0", "5.50", "9.1 %"), ("2", "5.50", "9.1 %"),
                                                                ("4", "5.50", "9.1 %")]  # 0.5 / 5.5
    runs = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert sorted(runs["first_epoch_time_s"]) == [6.5] * 5 + [14.3]  # the warm-up is recorded, not hidden
    groups = md_rows(s.markdown, "## Groups (mean ± std over seeds; CIs in summary_groups.csv)")
    assert [g["1st epoch s"] for g in groups] == [f"{(14.3 + 6.5) / 2:.1f}", "6.50", "6.50"]


def test_a_sweep_whose_runs_are_only_submitted_gets_its_summary_listing_them(tmp_path):
    # a detached SLURM sweep's end: manifest.json names the runs, none has a directory yet
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    jobs = [{"job_id": f"99_{i}", "job_num": i, "overrides": [f"coupling.alpha={a}"], "executor": "slurm",
             "run_dir": str(sweep / f"coupling.alpha={a}"), "submitted_at": "2026-12-03T15:00:00+0000",
             "runs_per_task": 1} for i, a in enumerate((0, 2))]
    (sweep / "manifest.json").write_text(json.dumps({"sweep_dir": str(sweep), "jobs": jobs}))
    s = write_summary([sweep])
    assert s.groups.empty and sorted(s.runs["status"]) == ["no results", "no results"]
    assert "_no finished runs_" in (sweep / "summary.md").read_text()


def test_epochs_uses_the_rows_collect_read_and_reads_only_the_runs_missing_from_them(tmp_path):
    a = make_run(tmp_path / "sweep" / "a", epochs=((50.0, 49.0, 10.0, 1.0), (60.0, 57.5, 10.0, 1.0)))
    b = make_run(tmp_path / "sweep" / "b", seed=2, epochs=((41.0, 40.0, 10.0, 1.0),))
    runs, read = review.runs_with_epochs([tmp_path / "sweep"])
    assert [(r["epoch"], r["val_acc"], r["ke_val_acc"]) for r in read[str(a)]] == [(1, 50.0, 49.0), (2, 60.0, 57.5)]
    (a / "epochs.csv").unlink()  # what epochs() shows of `a` can only come from the rows already read
    e = review.epochs(runs, {str(a): read[str(a)]})  # `b` left out of them: read from its file
    assert sorted(zip(e["run_dir"], e["epoch"], e["ke_drop"])) == [(str(a), 1, 1.0), (str(a), 2, 2.5), (str(b), 1, 1.0)]


def test_the_learning_curves_band_is_the_t_ci_of_the_runs_at_each_epoch():
    # three runs of one group at epoch 1 (val top-1 70, 72.5, 78), one run at epoch 2 (no band: n = 1)
    frame = pd.DataFrame({"facet": "f", "group": "g", "when": "before KE", "alpha": 0,
                          "epoch": [1, 1, 1, 2], "top1": [70.0, 72.5, 78.0, 80.0]})
    got = curve_stats(frame).set_index("epoch")
    low, high = t_ci([70.0, 72.5, 78.0])
    assert got.loc[1, "mean"] == pytest.approx(73.5) and got.loc[1, "n"] == 3
    assert (got.loc[1, "ci_low"], got.loc[1, "ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert got.loc[2, "mean"] == 80.0 and math.isnan(got.loc[2, "ci_low"]) and math.isnan(got.loc[2, "ci_high"])
