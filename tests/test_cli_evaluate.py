"""`jaxattr evaluate` end to end on a random-init ResNet-18 and two small images: scores against the
library called directly (and segmentation against sklearn and hand counts), the streaming pipeline
against the sequential path (--loaders), the report in a
headless browser, resuming, explaining first with --method, and bad input (one line, no traceback).

Inputs are 40x48 images through the model's 224 px eval transform; the metrics run with few curve
points (--step 12544: 5 RISE points, --mask-size 2: 5 I-GOS points) so every run is a few hundred
forward passes."""

import csv
import io
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics
import torchvision.transforms as T
from PIL import Image

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

from _browser import open_report  # noqa: E402

from jaxattr import cli, evaluation, explain, metrics  # noqa: E402
from jaxattr.image import load_image  # noqa: E402
from jaxattr.models import create_model, model_info  # noqa: E402
from jaxattr.models.weights import save_params  # noqa: E402

NAMES = ["im0", "im1"]
FAST = ["--step", "12544", "--mask-size", "2", "--chunk", "8", "--batch-size", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Random ResNet-18 weights, two noise images and their hand-made masks (a rectangle; an L shape)."""
    root = tmp_path_factory.mktemp("evaluate")
    save_params(root / "resnet18.safetensors", create_model("resnet18", weights=None).params, model="resnet18")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, name in enumerate(NAMES):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    rectangle = np.zeros((40, 48), np.uint8)
    rectangle[8:30, 10:40] = 255
    shape_l = np.zeros((40, 48), np.uint8)
    shape_l[5:35, 5:15] = 1
    shape_l[25:35, 5:45] = 1
    Image.fromarray(rectangle).save(root / "masks" / "im0.png")
    Image.fromarray(shape_l).save(root / "masks" / "im1.tif")  # any Pillow format; non-zero = foreground
    return root


def _main(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def explained(data) -> dict[str, Path]:
    dirs = {}
    for method in ("saliency", "gradcam"):
        dirs[method] = data / method
        argv = ["explain", data / "images", "--model", "resnet18", "--weights", data / "resnet18.safetensors",
                "--method", method, "--out", dirs[method], "--batch-size", "2"]
        assert _main(*argv) == 0
    return dirs


def _evaluate_all(explained, data, out: Path, loaders: int) -> int:
    """Both explain directories, every metric (segmentation too), through the pipeline or not."""
    return _main("evaluate", explained["saliency"], explained["gradcam"], "--out", out, "--masks", data / "masks",
                 "--loaders", loaders, *FAST)


@pytest.fixture(scope="module")
def evaluated(data, explained) -> Path:
    """Through the streaming pipeline: maps, images and masks read on two threads, files written on another."""
    out = data / "evaluation"
    assert _evaluate_all(explained, data, out, loaders=2) == 0
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _per_image(out: Path) -> dict:
    return {m: v["per_image"] for m, v in json.loads((out / "metrics.json").read_text())["methods"].items()}


def _assert_same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for method in a:
        assert a[method].keys() == b[method].keys()
        for metric in a[method]:
            np.testing.assert_allclose(a[method][metric], b[method][metric], rtol=1e-5, err_msg=f"{method} {metric}")


def _errors(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------- results


def test_scores_equal_the_library_called_directly(data, evaluated):
    """Every per-image score in metrics.json is what the metrics give on maps from jaxattr.explain."""
    info = model_info("resnet18")
    model = create_model("resnet18", weights=data / "resnet18.safetensors")
    images = jnp.asarray(np.stack([load_image(data / "images" / f"{n}.png", info) for n in NAMES]))
    transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(224)])
    truth = np.stack([np.asarray(transform(Image.open(p))) != 0 for p in (data / "masks" / "im0.png", data / "masks" / "im1.tif")])
    stored = _per_image(evaluated)
    for method in ("saliency", "gradcam"):
        result = explain(model, images, method)
        maps, targets = result.maps, result.targets
        expected = {
            "rise_deletion": metrics.rise_deletion(model, images, maps, targets, step=12544, chunk=8).auc,
            "rise_insertion": metrics.rise_insertion(model, images, maps, targets, step=12544, chunk=8).auc,
            "igos_deletion": metrics.igos_deletion(
                model, images, evaluation.saliency_cells(maps, 2), evaluation.igos_baselines(images), targets, chunk=8
            ).score,
            "pos": metrics.perturbation_curves(model, images, maps, targets, chunk=8).accuracy_auc,
            "ins": metrics.perturbation_curves(model, images, maps, targets, mode="negative", chunk=8).probability_auc,
            "adp": metrics.confidence_change(model, images, maps, targets).adp,
        }
        for metric, values in expected.items():
            np.testing.assert_allclose(stored[method][metric], np.asarray(values), rtol=1e-5, atol=1e-7, err_msg=f"{method} {metric}")
        # Segmentation: AP and F1 per image against sklearn on the min-max map thresholded at its mean.
        prediction = []
        for i in range(2):
            relevance = np.asarray(maps[i], np.float64)
            relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min())
            scores = np.concatenate([1 - relevance.ravel(), relevance.ravel()])
            labels = np.concatenate([~truth[i].ravel(), truth[i].ravel()])
            assert stored[method]["ap"][i] == pytest.approx(sklearn.metrics.average_precision_score(labels, scores), abs=1e-5)
            prediction.append(relevance > relevance.mean())
            assert stored[method]["f1"][i] == pytest.approx(sklearn.metrics.f1_score(truth[i].ravel(), prediction[i].ravel()), abs=1e-6)
        # Pixel accuracy and IoU pooled over the dataset, counted by hand.
        prediction = np.stack(prediction)
        dataset = json.loads((evaluated / "metrics.json").read_text())["methods"][method]["dataset"]
        assert dataset["pixel_accuracy"] == pytest.approx((prediction == truth).mean(), abs=1e-9)
        iou = [((prediction == c) & (truth == c)).sum() / ((prediction == c) | (truth == c)).sum() for c in (0, 1)]
        assert dataset["miou"] == pytest.approx(np.mean(iou), abs=1e-9) and dataset["images"] == 2


def test_output_files(evaluated, explained):
    assert {p.name for p in evaluated.iterdir()} == {
        "metrics.json", "metrics.csv", "report.html", "summary.json", "summary.csv", "inputs", "results",
        "curves_rise_deletion.png", "curves_rise_insertion.png", "curves_igos_deletion.png", "curves_igos_insertion.png",
    }
    rows = list(csv.DictReader((evaluated / "metrics.csv").open()))
    scores = evaluation.score_names(tuple(evaluation.METRIC_GROUPS))
    assert len([r for r in rows if r["kind"] == "image"]) == 2 * 2 * len(scores)
    assert len([r for r in rows if r["kind"] == "mean"]) == 2 * len(scores)
    stored = _per_image(evaluated)
    for row in rows:
        if row["kind"] == "image":
            value = stored[row["method"]][row["metric"]][NAMES.index(row["image"])]
            assert float(row["value"]) == pytest.approx(value, rel=1e-12)
    summary = json.loads((evaluated / "summary.json").read_text())
    assert [r["status"] for r in summary["images"]] == ["evaluated", "evaluated"]
    assert summary["images"][0]["gradcam.rise_deletion"] == pytest.approx(stored["gradcam"]["rise_deletion"][0])
    assert summary["settings"]["sources"][0]["explain"]["method"] == "saliency"
    with Image.open(evaluated / "curves_rise_deletion.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_report_in_headless_browser(evaluated, tmp_path):
    page = open_report(evaluated / "report.html", tmp_path / "shot.png")
    assert page.errors == [] and page.broken == []
    assert len(page.images) == 4 + 2 + 2 * 2  # curve plots, inputs, overlays
    assert page.mean_rows == 2 and "mIoU ↑" in page.headers


def test_the_pipeline_writes_what_the_sequential_run_writes(data, explained, evaluated):
    """--loaders 0 (read, score and write in turn) and the pipelined fixture write the same bytes:
    results, summaries, metrics, the curve plots, the inputs and the report (whose links to the
    overlays are relative: the two directories are siblings)."""
    out = data / "evaluation_sequential"
    assert _evaluate_all(explained, data, out, loaders=0) == 0
    sequential, pipelined = _files(out), _files(evaluated)
    assert sequential.keys() == pipelined.keys() and "results/im1.npz" in sequential and "curves_igos_deletion.png" in sequential
    assert [name for name in sequential if sequential[name] != pipelined[name]] == []


# ------------------------------------------------------------------------------- resuming


def test_resume_skips_finished_images_and_redoes_the_rest(data, explained, evaluated, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["evaluate", explained["saliency"], explained["gradcam"], "--out", out, "--metrics", "confidence",
            "--loaders", "2", *FAST]
    assert _main(*argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    capsys.readouterr()
    assert _main(*argv) == 0
    assert "2 of 2 images already evaluated" in _errors(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == before
    # As if interrupted before im1 was stored: only im1 is evaluated again, with the same scores.
    (out / "results" / "im1.npz").unlink()
    assert _main(*argv) == 0
    assert "1 of 2 images already evaluated" in _errors(capsys)
    assert (out / "results" / "im0.npz").stat().st_mtime_ns == before["im0.npz"]
    again, full = _per_image(out), _per_image(evaluated)
    _assert_same_scores(again, {m: {k: full[m][k] for k in again[m]} for m in again})
    # Other settings into the same directory are refused, naming what differs.
    assert _main(*argv[:-8], "--step", "4096", *FAST[2:]) == 1
    assert "other settings (step differ)" in _errors(capsys)


# ------------------------------------------------------------------------------- explaining first


def test_method_explains_first_with_options(data, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["evaluate", data / "images", "--method", "saliency,gradcam", "--option", "gradcam.relu=false",
            "--option", "saliency.output=probability", "--model", "resnet18", "--weights", data / "resnet18.safetensors",
            "--out", out, "--metrics", "confidence", *FAST]
    assert _main(*argv) == 0
    settings = json.loads((out / "explain" / "gradcam" / "summary.json").read_text())["settings"]
    assert settings["config"]["relu"] is False
    assert json.loads((out / "explain" / "saliency" / "summary.json").read_text())["settings"]["config"]["output"] == "probability"
    assert set(_per_image(out)) == {"saliency", "gradcam"} and set(_per_image(out)["gradcam"]) == {"adp", "pic", "add"}
    assert "explaining with gradcam" in _errors(capsys)
    for bad, message in [
        ("gradcam.nope=1", "gradcam has no option nope; options: layer, output, relu"),
        ("gradcam.relu=maybe", "expected true or false"),
        ("saliency.output=logits", "expected one of logit, probability"),
        ("smoothgrad.samples=2", "smoothgrad is not one of --method saliency,gradcam"),
        ("gradcam-relu", "expected METHOD.FIELD=VALUE"),
    ]:
        assert _main(*argv[:4], "--option", bad, *argv[4:]) == 2
        assert message in _errors(capsys)


def test_references_reach_the_methods_that_take_them(data, tmp_path, capsys, monkeypatch):
    from jaxattr import maps
    from jaxattr.config import Config, config, static
    from jaxattr.methods import base

    @config
    class ProbeConfig(Config):
        num_references: int | None = static(8)

    seen = []

    def probe(model, images, targets=None, *, config=None, key=None, references=None):
        seen.append(references)
        return images - jnp.mean(references, axis=0)

    spec = base.MethodSpec("refprobe", probe, ProbeConfig, "test", saliency=maps.abs_sum, contrast=maps.Contrast(),
                           takes_references=True)
    monkeypatch.setitem(base._METHODS, "refprobe", spec)
    common = ["--model", "resnet18", "--weights", data / "resnet18.safetensors", "--metrics", "confidence", *FAST]
    out = tmp_path / "ev"
    argv = ["evaluate", data / "images", "--method", "refprobe,saliency", "--references", data / "images", "--out", out]
    assert _main(*argv, *common) == 0
    assert seen and all(r.shape[0] == len(list((data / "images").iterdir())) for r in seen)
    assert "references" in json.loads((out / "explain" / "refprobe" / "summary.json").read_text())["settings"]
    assert "references" not in json.loads((out / "explain" / "saliency" / "summary.json").read_text())["settings"]
    assert _main("evaluate", data / "images", "--method", "saliency", "--references", data / "images",
                 "--out", tmp_path / "no", *common) == 2
    assert "--references: none of --method saliency takes reference images" in _errors(capsys)


# ------------------------------------------------------------------------------- bad input


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_an_unreadable_image_is_recorded_and_skipped_in_the_pipeline(data, explained, tmp_path, capsys):
    source = _copy(explained["saliency"], tmp_path / "saliency")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    summary = json.loads((source / "summary.json").read_text())
    summary["images"][0]["file"] = str(broken)  # im0's image, now unreadable
    (source / "summary.json").write_text(json.dumps(summary))
    runs = {}
    for loaders in (2, 0):
        runs[loaders] = tmp_path / f"ev{loaders}"
        assert _main("evaluate", source, "--out", runs[loaders], "--metrics", "confidence", "--loaders", loaders, *FAST) == 1
        assert "skipped unreadable" in _errors(capsys)
        records = {r["output"]: r for r in json.loads((runs[loaders] / "summary.json").read_text())["images"]}
        assert records["im0"]["status"] == "unreadable" and "broken.png" in records["im0"]["message"]
        assert records["im1"]["status"] == "evaluated"
        assert sorted(p.name for p in (runs[loaders] / "results").iterdir()) == ["im1.npz"]
    assert _files(runs[2]) == _files(runs[0])


def test_bad_maps_are_reported_and_the_rest_go_on(data, explained, tmp_path, capsys):
    """A NaN map (that image reported), a pixel map of another size (resized, said so), a constant map."""
    saliency = _copy(explained["saliency"], tmp_path / "saliency")
    gradcam = _copy(explained["gradcam"], tmp_path / "gradcam")
    nan = np.load(saliency / "im0.npy")
    nan[3, 4, 1] = np.nan
    np.save(saliency / "im0.npy", nan)
    np.save(saliency / "im1.npy", np.random.RandomState(0).rand(200, 200, 3).astype(np.float32))
    np.save(gradcam / "im0.npy", np.zeros((7, 7), np.float32))
    out = tmp_path / "ev"
    assert _main("evaluate", saliency, gradcam, "--out", out, "--metrics", "confidence", *FAST) == 1
    err = _errors(capsys)
    assert "saliency: NaN or inf in the map of im0" in err
    assert "saliency: the map of im1 is 200x200, the image 224x224: map resized (bilinear)" in err
    stored = _per_image(out)
    assert stored["saliency"]["adp"][0] is None and stored["saliency"]["adp"][1] is not None
    assert None not in stored["gradcam"]["adp"]  # the constant map has a defined score
    records = {r["output"]: r for r in json.loads((out / "summary.json").read_text())["images"]}
    assert records["im0"]["status"] == "incomplete" and records["im1"]["status"] == "evaluated"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy file whose header claims `shape` of float32 and holds 16 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return header.getvalue() + bytes(16)


def test_hostile_summaries_and_maps_are_reported_and_skipped(data, explained, tmp_path, capsys):
    """summary.json and the maps beside it are untrusted: output names that leave --out (relative
    or absolute), a class that is no index, an empty map, a header claiming 100000x100000x3 and a
    summary nested 200000 deep each give one line, and the rest of the evaluation goes on."""
    source = _copy(explained["saliency"], tmp_path / "saliency")
    summary = json.loads((source / "summary.json").read_text())
    im0 = summary["images"][0]
    escape = tmp_path / "escaped"
    summary["images"] += [
        {**im0, "output": "../../../escaped"},
        {**im0, "output": str(escape)},
        {**im0, "output": "im0b", "class_index": "abc"},
        ["not", "a", "record"],
    ]
    (source / "summary.json").write_text(json.dumps(summary))
    np.save(source / "im1.npy", np.zeros((0, 0, 3), np.float32))
    out = tmp_path / "ev"
    assert _main("evaluate", source, "--out", out, "--metrics", "confidence", *FAST) == 1
    err = _errors(capsys)
    assert "output name '../../../escaped', not a plain file name; skipped" in err
    assert f"output name {str(escape)!r}, not a plain file name; skipped" in err
    assert "has the class 'abc', not a class index; skipped" in err and "record 5 is not an object; skipped" in err
    assert "unreadable map im1.npy (holds an empty array of shape (0, 0, 3))" in err
    assert not list(tmp_path.rglob("escaped*")) and not list(Path("/").glob("escaped*"))
    assert sorted(r["output"] for r in json.loads((out / "summary.json").read_text())["images"]) == ["im0", "im1"]

    (source / "im1.npy").write_bytes(_npy_header((100000, 100000, 3)))
    assert _main("evaluate", source, "--out", tmp_path / "ev2", "--metrics", "confidence", *FAST) == 1
    assert "its header claims shape (100000, 100000, 3)" in _errors(capsys)

    (source / "summary.json").write_text("[" * 200000 + "]" * 200000)
    assert _main("evaluate", source, "--out", tmp_path / "ev3", *FAST) == 1
    err = _errors(capsys)
    assert err.count("\n") == 1 and "is not a summary of `jaxattr explain` (nested too deeply)" in err
    # explain resuming into that directory: a warning, and the run goes on
    argv = ["explain", data / "images" / "im0.png", "--model", "resnet18", "--weights", data / "resnet18.safetensors",
            "--method", "saliency", "--out", source, "--no-compile-cache"]
    assert _main(*argv) == 0
    assert "ignoring unreadable" in _errors(capsys)


def test_directories_that_cannot_be_compared_are_refused(data, explained, tmp_path, capsys):
    other_model = _copy(explained["gradcam"], tmp_path / "other_model")
    summary = json.loads((other_model / "summary.json").read_text())
    summary["settings"]["model"] = "resnet34"
    (other_model / "summary.json").write_text(json.dumps(summary))
    fewer = _copy(explained["gradcam"], tmp_path / "fewer")
    summary = json.loads((fewer / "summary.json").read_text())
    summary["images"] = summary["images"][:1]
    (fewer / "summary.json").write_text(json.dumps(summary))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = _copy(explained["gradcam"], tmp_path / "no_images")
    (no_images / "summary.json").write_text(json.dumps({"settings": summary["settings"], "images": []}))
    out = tmp_path / "ev"
    for inputs, message in [
        ([explained["saliency"], other_model], "other_model holds explanations of resnet34 with"),
        ([explained["saliency"], fewer], "explain different images (only in"),
        ([empty], "empty is not an output directory of `jaxattr explain` (no summary.json)"),
        ([no_images], "no_images holds no explained images"),
        ([data / "images" / "im0.png"], "im0.png is a file: evaluate takes output directories of `jaxattr explain`"),
    ]:
        assert _main("evaluate", *inputs, "--out", out, *FAST) == 1
        err = _errors(capsys)
        assert message in err and err.count("\n") == 1, err
    assert _main("evaluate", explained["saliency"], "--out", out, "--model", "vgg11", *FAST) == 1
    assert "--model vgg11, but" in _errors(capsys)
    for extra, message in [
        (["--metrics", "segmentation"], "the segmentation metric needs --masks DIR"),
        (["--target", "3"], "--target configure explanations: only with --method"),
        (["--metrics", "rise,deletion"], "unknown metric deletion"),
        (["--step", "many"], "expected a number of pixels or one of single, batched"),
        (["--fill", "0.1,0.2"], "expected one value or R,G,B"),
        (["--loaders", "-1"], "argument --loaders: must be 0 or more, got -1"),
    ]:
        assert _main("evaluate", explained["saliency"], "--out", out, *extra) == 2
        assert message in _errors(capsys)
    # The output directory is never one it reads: an explain directory, or an image directory of --method.
    before = sorted(p.name for p in Path(explained["saliency"]).iterdir())
    assert _main("evaluate", explained["saliency"], "--out", explained["saliency"]) == 1
    assert "is an input directory" in _errors(capsys)
    assert sorted(p.name for p in Path(explained["saliency"]).iterdir()) == before
    images = data / "images"
    assert _main("evaluate", images, "--method", "saliency", "--out", images) == 1
    assert "is an input directory" in _errors(capsys)
    assert _main("evaluate", images, "--method", "saliency", "--recursive", "--out", images / "scores") == 1
    assert "scanned with --recursive" in _errors(capsys)
    assert not out.exists() and not (images / "scores").exists()


def test_bad_masks(data, explained, tmp_path, capsys):
    """Another size and more than two values are reported per image; --threshold accepts the values."""
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "im0.png")
    three = np.zeros((40, 48), np.uint8)
    three[5:20, 5:20], three[20:30, 20:40] = 1, 2
    Image.fromarray(three).save(masks / "im1.png")
    base = ["evaluate", explained["saliency"], "--metrics", "segmentation", "--masks", masks, *FAST]
    assert _main(*base, "--out", tmp_path / "a") == 1
    err = _errors(capsys)
    assert "the mask is 10x10, its image im0.png 48x40; give each mask its image's size" in err
    assert "the mask holds values 0, 1, 2: expected 0 (background) and one foreground value" in err and "--threshold X" in err
    (masks / "im0.png").unlink()
    assert _main(*base, "--out", tmp_path / "b", "--threshold", "0") == 1  # im0: no mask
    err = _errors(capsys)
    assert "no mask named im0.* in" in err
    assert _per_image(tmp_path / "b")["saliency"]["miou"][0] is not None  # im1 scored: the report holds it alone
    empty = tmp_path / "none"
    empty.mkdir()
    assert _main("evaluate", explained["saliency"], "--masks", empty, "--out", tmp_path / "c", *FAST) == 1
    assert "no mask in" in _errors(capsys)


def test_igos_masks_beside_the_maps_are_scored(data, explained, tmp_path, capsys):
    """<name>.mask.npy beside a map (what I-GOS's explain writes) is scored by the I-GOS
    metric instead of the map's cells."""
    source = _copy(explained["saliency"], tmp_path / "igos_like")
    masks = np.random.RandomState(4).rand(2, 2, 2).astype(np.float32)  # as --mask-size 2: the compiled programs are reused
    for name, mask in zip(NAMES, masks):
        np.save(source / f"{name}.mask.npy", mask)
    out = tmp_path / "ev"
    assert _main("evaluate", source, "--out", out, "--metrics", "igos", *FAST) == 0
    info = model_info("resnet18")
    model = create_model("resnet18", weights=data / "resnet18.safetensors")
    images = jnp.asarray(np.stack([load_image(data / "images" / f"{n}.png", info) for n in NAMES]))
    targets = [r["class_index"] for r in sorted(json.loads((source / "summary.json").read_text())["images"], key=lambda r: r["output"])]
    expected = metrics.igos_deletion(model, images, masks, evaluation.igos_baselines(images), jnp.asarray(targets), chunk=8)
    np.testing.assert_allclose(_per_image(out)["saliency"]["igos_deletion"], np.asarray(expected.score), rtol=1e-5)

    # Masks optimised against another baseline (explain's --blur-kernel) are scored over that one.
    other = _copy(source, tmp_path / "igos_kernel5")
    summary = json.loads((other / "summary.json").read_text())
    summary["settings"]["config"]["blur_kernel"] = 5
    (other / "summary.json").write_text(json.dumps(summary))
    assert _main("evaluate", other, "--out", tmp_path / "ev5", "--metrics", "igos", *FAST) == 0
    expected = metrics.igos_deletion(model, images, masks, evaluation.igos_baselines(images, 5), jnp.asarray(targets), chunk=8)
    np.testing.assert_allclose(_per_image(tmp_path / "ev5")["saliency"]["igos_deletion"], np.asarray(expected.score), rtol=1e-5)
    _errors(capsys)
    assert _main("evaluate", source, other, "--out", tmp_path / "both", "--metrics", "igos", *FAST) == 1
    assert "optimised against different baselines (--blur-kernel 5, default)" in _errors(capsys)
