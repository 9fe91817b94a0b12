"""summary.html (coupled_net.htmlreport): one self-contained page whose tables say what summary.md and
summary_groups.csv say, checked on a hand-made sweep with numbers computed here, then opened in a real
headless Chromium (`.ci/run` installs Debian's): every inline image decodes at the PNG's own width, the
screenshot is not blank, and the page's text shows the headline numbers."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from coupled_net import review
from coupled_net.htmlreport import provenance as provenance_rows
from coupled_net.report import write_summary
from helpers import make_run

# test top-1 per (alpha, seed): alpha 0 → 80, 82, 84 (mean 82.00, std 2.00); alpha 4 → 81, 83.5, 86
# (mean 83.50, std 2.50); the paired Δ per seed is 1, 1.5, 2: mean +1.50, std 0.5, t(0.975, 2) = 4.3027,
# half-width 4.3027 * 0.5 / √3 = 1.2421 → CI [+0.26, +2.74]
TOP1 = {(0, 1): 80.0, (0, 2): 82.0, (0, 3): 84.0, (4, 1): 81.0, (4, 2): 83.5, (4, 3): 86.0}
# (val_acc, ke_val_acc, epoch_time_s, ke_eval_time_s): every epoch 10 s, KE + validation 1 s → KE cost 10.0 %
EPOCHS = ((50.0, 49.0, 10.0, 1.0), (60.0, 58.0, 10.0, 1.0))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def provenance(seed: int, dirty: bool) -> dict:
    return {"device": "cpu (test)", "git_commit": "0123abc", "git_dirty": dirty, "python": "3.11.2",
            "torch": "2.5.1", "torchvision": "0.20.1", "host": f"node{seed}", "gpu": None}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("html") / "sweep"
    for (alpha, seed), top1 in TOP1.items():
        make_run(root / f"coupling.alpha={alpha},seed={seed}", test_top1=top1, epochs=EPOCHS, best_epoch=2,
                 coupling__alpha=alpha, seed=seed,
                 results={"provenance": provenance(seed, dirty=(alpha, seed) == (4, 3)),
                          "started_at": f"2026-11-2{seed}T10:0{alpha}:00+0000",
                          "finished_at": f"2026-11-2{seed}T11:0{alpha}:00+0000"})
    make_run(root / "broken", status="failed", test_top1=None, coupling__alpha=8, seed=1,
             results={"error": "RuntimeError: <boom> & co", "provenance": provenance(1, dirty=False)})
    write_summary([root])
    return root


class Tables(HTMLParser):
    """Every <table id=…>'s rows as [(tag, text, colspan)], every <img>'s attributes, the <section> ids
    in order, every src/href and the page's text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.sections, self.text, self.links = {}, [], [], [], []
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [tag, "", int(a.get("colspan", 1))]
        elif tag == "img":
            self.images.append(a)
        elif tag == "section":
            self.sections.append(a.get("id"))
        self.links += [value for name, value in attrs if name in ("src", "href")]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1] += data


def columns(rows) -> list[tuple[str, ...]]:
    """A Styler table's column names, one tuple of header levels per column (colspans expanded)."""
    levels = [[text for tag, text, span in row for _ in range(span)] for row in rows if row[0][0] == "th"]
    return list(zip(*levels))


def body(rows) -> list[list[str]]:
    return [[text for _, text, _ in row] for row in rows if row and row[0][0] == "td"]


def png_size(src: str) -> tuple[int, int]:
    assert src.startswith("data:image/png;base64,"), src[:60]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size


def test_summary_html_holds_summary_md_s_tables_the_csv_s_numbers_and_fetches_nothing(page):
    html = (page / "summary.html").read_text()
    doc = Tables(html)
    assert doc.sections == ["headline", "groups", "deltas", "timings", "plots", "left-out", "provenance"]
    # the headline table: the same cells as summary.md's, numbers hand-computed above
    head = doc.tables["T_headline"]
    assert columns(head) == [("alpha",), ("n",), ("test top-1",), ("Δ vs alpha=0 [95 % CI]",), ("p",),
                             ("KE drop",), ("epoch s",), ("KE cost",)]
    rows = body(head)
    assert [r[:4] for r in rows] == [["0", "3", "82.00 ± 2.00", "baseline"],
                                     ["4", "3", "83.50 ± 2.50", "+1.50 [+0.26, +2.74]"]]
    assert [r[6:] for r in rows] == [["10.0", "10.0 %"], ["10.0", "10.0 %"]]
    md = (page / "summary.md").read_text()
    for r in rows:  # every headline cell is summary.md's, in the same row
        assert re.search(r"\|\s*" + r"\s*\|\s*".join(map(re.escape, r)) + r"\s*\|", md), r
    # the groups table: summary_groups.csv's numbers, two decimals
    groups = doc.tables["T_groups"]
    names = columns(groups)
    cells = body(groups)
    csv = pd.read_csv(page / "summary_groups.csv")
    assert len(cells) == len(csv) == 2
    for metric, label in (("test_top1", "test top-1"), ("val_top1", "val top-1"), ("ke_drop_mean", "KE drop")):
        for stat, sub in (("mean", "mean"), ("ci_low", "95 % CI low"), ("ci_high", "95 % CI high")):
            shown = [row[names.index((label, sub))] for row in cells]
            assert shown == [f"{v:.2f}" for v in csv[f"{metric}_{stat}"]], (metric, stat)
    assert [row[names.index(("test top-1", "mean"))] for row in cells] == ["82.00", "83.50"]
    # t(0.975, 2) * 2.00 / √3 = 4.9683 around 82.00
    assert [row[names.index(("test top-1", "95 % CI low"))] for row in cells][0] == "77.03"
    # the runs left out, their error escaped (shown as written, not as markup)
    left = body(doc.tables["T_left-out"])
    assert [(r[0].rsplit("/", 1)[-1], r[1], r[4]) for r in left] == [("broken", "failed", "RuntimeError: <boom> & co")]
    assert "<boom>" not in html and "&lt;boom&gt; &amp; co" in html
    # provenance from the runs' results.json
    prov = dict(body(doc.tables["T_provenance"]))
    assert prov["commit"] == "0123abc (clean) (6 runs), 0123abc (dirty tree) (1 run)"
    assert prov["torch"] == "2.5.1" and prov["python"] == "3.11.2"
    assert prov["hosts"] == "node1 (3 runs), node2 (2 runs), node3 (2 runs)"
    assert prov["started (first … last)"] == "2026-11-21T10:00:00+00:00 … 2026-11-23T10:04:00+00:00"
    assert prov["runs read"] == "7 of 7 results.json"
    # self-contained: the three plots inline at their files' sizes, nothing fetched, no script
    assert [i["alt"] for i in doc.images] == ["summary_test_top1_vs_alpha.png", "summary_delta_vs_alpha.png",
                                              "summary_learning_curves.png"]
    for img in doc.images:
        assert png_size(img["src"]) == Image.open(page / img["alt"]).size
    assert "<script" not in html.lower()
    assert len(doc.links) == 3 and all(link.startswith("data:image/png;base64,") for link in doc.links)
    assert not re.search(r"https?://|@import|url\(", html, re.I)


def test_a_sweep_with_no_finished_run_gets_a_page_listing_its_runs_and_provenance(tmp_path):
    root = tmp_path / "sweep"
    make_run(root / "a", status="failed", test_top1=None, results={"error": "ValueError: bad lr"})
    make_run(root / "b", status="interrupted", test_top1=None, seed=2,
             results={"provenance": {"device": "cpu (test)", "git_commit": "feed123", "git_dirty": None}})
    write_summary([root])
    doc = Tables((root / "summary.html").read_text())
    assert doc.sections == ["headline", "left-out", "provenance"] and doc.images == []
    assert "no finished runs" in doc.text
    assert [(r[0].rsplit("/", 1)[-1], r[1], r[4]) for r in body(doc.tables["T_left-out"])] == [
        ("a", "failed", "ValueError: bad lr"), ("b", "interrupted", "")]
    prov = dict(body(doc.tables["T_provenance"]))
    assert (prov["commit"], prov["python"], prov["devices"]) == ("feed123 (dirty: unknown)", "not recorded",
                                                                 "cpu (test)")


INSPECT = """<script>window.addEventListener("load", () => {
  for (const img of document.images) img.setAttribute("data-natural-width", img.naturalWidth);
  document.body.setAttribute("data-images-checked", document.images.length);
});</script>"""


def chromium(*args, profile) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (.ci/run installs Debian's chromium)")
def test_summary_html_renders_in_headless_chromium_with_every_image_decoded(page, tmp_path):
    html = (page / "summary.html").read_text()
    widths = [png_size(img["src"])[0] for img in Tables(html).images]
    # the report has no script of its own: the test adds one to a copy, to read what the browser decoded
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", INSPECT + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-checked="3"' in dom.stdout, dom.stdout[-2000:]
    decoded = [int(w) for w in re.findall(r'<img[^>]*data-natural-width="(\d+)"', dom.stdout)]
    assert decoded == widths and all(w > 0 for w in decoded)  # a broken image's naturalWidth is 0
    text = " ".join(Tables(dom.stdout).text)
    for shown in ("82.00 ± 2.00", "83.50 ± 2.50", "+1.50 [+0.26, +2.74]", "RuntimeError: <boom> & co"):
        assert shown in text, shown

    shot = tmp_path / "page.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,4000", (page / "summary.html").as_uri(),
                   profile=tmp_path / "profile")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4000)
    colours = image.getcolors(maxcolors=1 << 20)
    white = next((n for n, c in colours if c == (255, 255, 255)), 0)
    assert len(colours) > 50  # text, table rules and three plots: far more than a blank page's one colour
    assert white < 0.97 * image.width * image.height


def test_provenance_comes_from_the_collected_frame_and_counts_only_the_results_json_read(tmp_path):
    root = tmp_path / "sweep"
    gpu = {"name": "NVIDIA H200", "driver": "580.1", "cuda": "13.0"}
    make_run(root / "a", test_top1=80.0, results={"provenance": {**provenance(1, dirty=False), "gpu": gpu},
                                                   "started_at": "2026-11-21T10:00:00+0000"})
    make_run(root / "b", test_top1=81.0, seed=2)
    (root / "b" / "results.json").write_text('{"status": "do')  # torn: nothing of it is read
    runs = review.runs([root])
    a = runs[runs["run_dir"] == str(root / "a")].iloc[0]
    assert (a["git_commit"], a["git_dirty"], a["python_version"], a["torch_version"], a["host"], a["gpu"],
            a["started_at"]) == ("0123abc", False, "3.11.2", "2.5.1", "node1", gpu, "2026-11-21T10:00:00+0000")
    b = runs[runs["run_dir"] == str(root / "b")].iloc[0]
    assert b["status"] == "unreadable" and b[["git_commit", "host", "gpu", "started_at"]].isna().all()
    prov = dict(provenance_rows(runs))
    assert prov["GPUs"] == "NVIDIA H200 (driver 580.1, CUDA 13.0)"
    assert prov["hosts"] == "node1" and prov["commit"] == "0123abc (clean)"
    assert prov["runs read"] == "1 of 2 results.json"
