"""The evaluation report: statistics, metrics.json/.csv, curve plots and the HTML page, checked in
a real headless browser (Debian's chromium driven by Playwright) when one is installed."""

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

from _browser import open_report  # noqa: E402
from PIL import Image  # noqa: E402

from jaxattr import metrics, report, viz  # noqa: E402

IMAGES = ["cat", "dog <&>", "car"]


class Page(HTMLParser):
    """What the report's HTML holds: image sources, rows of the means table, best-marked cells."""

    def __init__(self):
        super().__init__()
        self.sources, self.mean_rows, self.best = [], [], []
        self._table, self._row = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        elif tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "means" and attrs.get("class") == "method":
            self._row = []
            self.mean_rows.append(self._row)
        elif tag == "td" and self._row is not None:
            self._row.append(attrs.get("class"))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table, self._row = None, None


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def synthetic_records(tmp_path: Path) -> list[report.MethodRecords]:
    """Two methods on three images; method b has one unscored image (NaN)."""
    overlays = {}
    for name in ("a", "b"):
        overlays[name] = []
        for i in range(3):
            path = tmp_path / "overlays" / name / f"{i}.png"
            viz.save_png(path, np.full((8, 8, 3), 0.2 * i, np.float32))
            overlays[name].append(path)
    x = np.linspace(0, 1, 5)
    return [
        report.MethodRecords(
            "a",
            {"rise_deletion": [0.2, 0.3, 0.4], "rise_insertion": [0.7, 0.6, 0.8]},
            {"rise_deletion": report.CurveSet(x, np.tile(1 - x, (3, 1)), 0.3)},
            overlays["a"],
        ),
        report.MethodRecords(
            "b",
            {"rise_deletion": [0.1, math.nan, 0.3], "rise_insertion": [0.5, math.nan, 0.6], "custom": [1, 2, 3]},
            {"rise_deletion": report.CurveSet(x, np.stack([1 - x, np.full(5, np.nan), 1 - x**2]), 0.2)},
            overlays["b"],
            {"miou": 0.5},
        ),
    ]


def test_bootstrap_interval():
    values = np.random.RandomState(0).normal(3.0, 2.0, size=400)
    s = report.summarize(values, seed=1)
    assert s.n == 400 and s.mean == pytest.approx(values.mean())
    # The percentile bootstrap of a mean approaches the normal interval mean +- 1.96 sd / sqrt(n).
    half = 1.96 * values.std() / math.sqrt(values.size)
    assert s.low == pytest.approx(s.mean - half, abs=0.2 * half) and s.high == pytest.approx(s.mean + half, abs=0.2 * half)
    assert report.summarize(values, seed=1) == s  # seeded
    assert report.summarize(values, seed=2) != s
    assert report.summarize([np.nan, 2.0, np.inf]) == report.Summary(2.0, 2.0, 2.0, 1)
    empty = report.summarize([np.nan])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_files(tmp_path):
    records = synthetic_records(tmp_path)
    out = tmp_path / "report"
    files = report.write_report(out, IMAGES, records, settings={"model": "resnet18"}, samples=200, seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["curves_rise_deletion.png", "metrics.csv", "metrics.json", "report.html"]

    data = json.loads(files.json.read_text())
    b = data["methods"]["b"]
    assert b["per_image"]["rise_deletion"] == [0.1, None, 0.3]  # NaN: not scored
    assert b["summary"]["rise_deletion"]["mean"] == pytest.approx(0.2) and b["summary"]["rise_deletion"]["n"] == 2
    x = np.linspace(0, 1, 5)
    assert b["curves"]["rise_deletion"]["mean"] == pytest.approx(list((2 - x - x**2) / 2))  # the NaN curve left out
    assert data["metrics"]["rise_deletion"]["higher_is_better"] is False
    assert data["bootstrap"] == {"samples": 200, "seed": 3, "confidence": 0.95, "method": "percentile"}
    summary = report.summarize([0.2, 0.3, 0.4], samples=200, seed=3)
    assert data["methods"]["a"]["summary"]["rise_deletion"] == {"mean": summary.mean, "ci_low": summary.low, "ci_high": summary.high, "n": 3}

    rows = list(csv.DictReader(files.csv.open()))
    per_image = [r for r in rows if r["kind"] == "image"]
    means = [r for r in rows if r["kind"] == "mean"]
    assert len(per_image) == 3 * (2 + 3) and len(means) == 2 + 3
    assert {r["image"] for r in per_image} == set(IMAGES)
    row = next(r for r in means if r["method"] == "a" and r["metric"] == "rise_deletion")
    assert float(row["value"]) == pytest.approx(0.3) and float(row["ci_low"]) <= 0.3 <= float(row["ci_high"])

    with Image.open(files.curves[0]) as png:
        assert png.format == "PNG" and png.size[0] > 300

    page = parse(files.html)
    assert len(page.mean_rows) == 2
    # Best per column: deletion (lower) b, insertion (higher) a; 'custom' has no direction.
    assert page.mean_rows[0] == ["name", None, "best", None]
    assert page.mean_rows[1] == ["name", "best", None, None]
    for src in page.sources:  # relative paths that resolve
        assert not src.startswith(("/", "data:")) and (out / src).is_file(), src
    assert len(page.sources) == 1 + 2 * 3
    assert "dog &lt;&amp;&gt;" in files.html.read_text()  # names are escaped
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_embedded_images(tmp_path):
    records = synthetic_records(tmp_path)
    files = report.write_report(tmp_path / "r", IMAGES, records, embed_images=True, image_paths=[records[0].overlays[0]] * 3)
    page = parse(files.html)
    assert len(page.sources) == 1 + 3 + 2 * 3 and all(s.startswith("data:image/png;base64,") for s in page.sources)


def test_bad_input(tmp_path):
    records = synthetic_records(tmp_path)
    with pytest.raises(ValueError, match="2 rise_deletion values for 3 images"):
        report.write_report(tmp_path / "r", IMAGES, [report.MethodRecords("a", {"rise_deletion": [1, 2]})])
    with pytest.raises(ValueError, match="distinct"):
        report.write_report(tmp_path / "r", IMAGES, [records[0], records[0]])
    with pytest.raises(ValueError, match="no methods"):
        report.write_report(tmp_path / "r", IMAGES, [])
    missing = report.MethodRecords("m", {}, overlays=[tmp_path / "nope.png"] * 3)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        report.write_report(tmp_path / "r", IMAGES, [missing])
    with pytest.raises(TypeError, match="not a jaxattr.metrics result"):
        report.method_records("m", {"rise_deletion": np.zeros(3)})


def _tiny_forward():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (3, 3, 3, 4)), "d": jax.random.normal(k2, (4, 3))}

    def forward(p, x):
        h = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return 3 * jax.nn.relu(h).mean(axis=(1, 2)) @ p["d"]

    return jax.tree_util.Partial(forward, params)


@pytest.fixture(scope="module")
def metric_report(tmp_path_factory):
    """A report from real metric results: two methods, three images, one NaN map."""
    out = tmp_path_factory.mktemp("evaluation")
    forward, fill = _tiny_forward(), jnp.full(3, 0.5)
    images = np.random.RandomState(0).rand(3, 16, 16, 3).astype(np.float32)
    masks = np.random.RandomState(1).rand(3, 16, 16) > 0.5
    records = []
    for m, name in enumerate(["saliency", "gradcam"]):
        maps = np.random.RandomState(2 + m).rand(3, 16, 16).astype(np.float32)
        maps[1, 0, 0] = np.nan if m == 1 else maps[1, 0, 0]
        scores = metrics.segmentation_scores(maps, masks)
        results = {
            "rise_deletion": metrics.rise_deletion(forward, images, maps, fill=fill, step=32),
            "rise_insertion": metrics.rise_insertion(forward, images, maps, fill=fill, step=32),
            "igos_deletion": metrics.igos_deletion(forward, images, -maps[:, ::2, ::2], images * 0.3),
            "positive": metrics.perturbation_curves(forward, images, maps, fill=fill),
            "confidence": metrics.confidence_change(forward, images, maps, fill=fill),
            "segmentation": scores,
        }
        overlays = []
        for i in range(3):
            overlays.append(out / "maps" / name / f"{i}.png")
            viz.save_png(overlays[-1], viz.overlay(images[i], np.nan_to_num(maps[i])))
        totals = metrics.segmentation.update(metrics.segmentation.init(), scores)
        records.append(report.method_records(name, results, overlays, metrics.segmentation.result(totals)))
    originals = []
    for i in range(3):
        originals.append(out / "images" / f"{i}.png")
        viz.save_png(originals[-1], images[i])
    files = report.write_report(out / "report", ["a", "b", "c"], records, image_paths=originals, settings={"model": "tiny"})
    return files, records


def test_method_records_from_metric_results(metric_report):
    files, records = metric_report
    saliency, gradcam = records
    assert set(saliency.scores) == {"rise_deletion", "rise_insertion", "igos_deletion", "pos", "del", "adp", "pic", "add",
                                    "pixel_accuracy", "miou", "ap", "f1"}
    assert set(saliency.curves) == {"rise_deletion", "rise_insertion", "igos_deletion"}
    assert math.isnan(gradcam.scores["rise_deletion"][1]) and math.isnan(gradcam.scores["ap"][1])
    assert gradcam.dataset["images"] == 2 and gradcam.dataset["skipped"] == 1
    data = json.loads(files.json.read_text())
    assert data["methods"]["gradcam"]["summary"]["rise_deletion"]["n"] == 2
    assert len(files.curves) == 3


def test_report_in_headless_browser(metric_report, tmp_path):
    """Chromium loads the report without errors, every image resolves, one table row per method."""
    files, records = metric_report
    page = open_report(files.html, tmp_path / "report.png")
    assert page.errors == []
    assert len(page.images) == 3 + 3 + 3 * 2  # curve plots, originals, overlays
    assert page.broken == []
    assert page.mean_rows == len(records)
    assert page.headers[0] == "method" and "RISE deletion AUC ↓" in page.headers
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[0] == 1280 and shot.size[1] > 900
