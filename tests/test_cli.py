"""End-to-end runs of the `jaxattr` command line on a random-init ResNet-18 and tiny images."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxattr.viz
from jaxattr import cli, explain, imagenet_labels, maps
from jaxattr.cli import explain as explain_command
from jaxattr.config import Config, config, static
from jaxattr.image import load_image
from jaxattr.methods import base as method_base
from jaxattr.maps import Contrast
from jaxattr.methods import list_methods, method_spec
from jaxattr.methods.base import MethodSpec
from jaxattr.models import create_model, list_models, model_info
from jaxattr.run import Progress, output_names
from jaxattr.models.registry import cache_path
from jaxattr.models.weights import save_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random-init ResNet-18 weights in jaxattr's format, passed with --weights."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_params(path, create_model("resnet18", weights=None).params, model="resnet18")
    return path


def _noise(seed: int, shape=(24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def images(tmp_path) -> Path:
    """RGB, grey, RGBA and 16-bit PNGs plus a corrupt JPEG."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_noise(0)).save(folder / "rgb.png")
    Image.fromarray(_noise(1, (24, 32))).save(folder / "grey.png")
    Image.fromarray(_noise(2, (24, 32, 4))).save(folder / "rgba.png")
    Image.fromarray(_noise(3, (24, 32)).astype(np.uint16) * 257).save(folder / "sixteen.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def _explain(inputs, out, weights, *extra) -> int:
    """`jaxattr explain` with saliency (the cheapest method) unless `extra` names another one."""
    argv = ["explain", *map(str, inputs), "--model", "resnet18", "--weights", str(weights), "--out", str(out)]
    return cli.main([*argv, "--batch-size", "2", "--method", "saliency", *extra])


def _summary(out: Path) -> dict[str, dict]:
    return {r["output"]: r for r in json.loads((out / "summary.json").read_text())["images"]}


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".png", ".npy")}


# ------------------------------------------------------------------------------- explain


def test_explain_writes_outputs_and_skips_a_corrupt_file(images, tmp_path, weights, capsys):
    out = tmp_path / "out"
    assert _explain([images], out, weights) == 1  # one image failed
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "not an image file" in captured.err
    explained = ["grey", "rgb", "rgba", "sixteen"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.{ext}" for n in explained for ext in ("png", "npy")] + ["summary.json", "summary.csv"]
    )
    summary = _summary(out)
    assert summary["broken"]["status"] == "unreadable" and "not an image" in summary["broken"]["message"]
    model = create_model("resnet18", weights=weights)
    for name in explained:
        record = summary[name]
        assert record["status"] == "explained"
        assert record["label"] in captured.out and record["file"] in captured.out
        attribution = np.load(out / f"{name}.npy")
        # The saved attribution is what the Python API gives for the preprocessed image.
        image = load_image(images / f"{name}.png", model_info("resnet18"))
        expected = explain(model, jnp.asarray(np.stack([image, image])), "saliency")
        np.testing.assert_allclose(attribution, np.asarray(expected.attributions[0]), rtol=1e-4, atol=1e-6)
        assert record["class_index"] == int(expected.targets[0])
        assert record["probability"] == pytest.approx(float(expected.probabilities[0]), rel=1e-4)
        with Image.open(out / f"{name}.png") as png:
            assert png.size == (224, 224) and png.mode == "RGB"
    csv_lines = (out / "summary.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("file,output,status") and len(csv_lines) == 6


def test_resume_skips_finished_images_and_overwrite_redoes_them(images, tmp_path, weights, capsys):
    (images / "broken.jpg").unlink()
    out = tmp_path / "out"
    assert _explain([images], out, weights) == 0
    first = _mtimes(out)
    capsys.readouterr()
    assert _explain([images], out, weights) == 0
    assert _mtimes(out) == first
    captured = capsys.readouterr()
    assert "4 of 4 images already have outputs" in captured.err
    assert all(r["status"] == "explained" for r in _summary(out).values())  # carried over
    assert _explain([images], out, weights, "--overwrite") == 0
    assert all(_mtimes(out)[name] != first[name] for name in first)


def test_a_crash_mid_run_keeps_finished_images_and_a_rerun_resumes(
    images, tmp_path, weights, monkeypatch, capsys
):
    (images / "broken.jpg").unlink()
    out = tmp_path / "out"
    calls = []
    real = explain_command.BatchProgram.__call__

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_command.BatchProgram, "__call__", crash_on_second_batch)
    assert _explain([images], out, weights) == 130
    assert "resume" in capsys.readouterr().err
    done = sorted(p.stem for p in out.glob("*.png"))
    assert done == ["grey", "rgb"]  # the first batch, complete
    assert sorted(_summary(out)) == done
    assert [p for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary files
    monkeypatch.setattr(explain_command.BatchProgram, "__call__", real)
    assert _explain([images], out, weights) == 0
    assert "2 of 4 images already have outputs" in capsys.readouterr().err
    assert sorted(_summary(out)) == ["grey", "rgb", "rgba", "sixteen"]


def test_a_stochastic_method_gives_an_image_the_same_map_in_any_batch(images, tmp_path, weights):
    """Keys come from the seed and each image's name, so a resumed run (other batches) matches."""
    files = [images / "rgb.png", images / "grey.png", images / "rgba.png"]
    options = ["--method", "smoothgrad", "--samples", "2", "--seed", "7"]
    assert _explain(files, tmp_path / "together", weights, *options) == 0  # batches [rgb, grey], [rgba]
    assert cli.main(
        ["explain", str(files[1]), "--model", "resnet18", "--weights", str(weights),
         "--out", str(tmp_path / "alone"), "--batch-size", "1", *options]
    ) == 0
    together, alone = np.load(tmp_path / "together" / "grey.npy"), np.load(tmp_path / "alone" / "grey.npy")
    other_seed = tmp_path / "other-seed"
    assert _explain(files[1:2], other_seed, weights, *options[:-1], "8") == 0
    # Same noise. Only the program's batch size differs, and with it XLA's fusion of the noise
    # arithmetic (an ulp here and there, which may flip a ReLU in a few places); other noise
    # changes nearly every element.
    apart = lambda a: np.mean(np.abs(a - alone) > 1e-6 * np.abs(alone).max())
    assert apart(together) < 0.02 and np.abs(together - alone).max() < 0.02 * np.abs(alone).max()
    assert apart(np.load(other_seed / "grey.npy")) > 0.5


def test_other_settings_in_the_same_directory_are_refused(images, tmp_path, weights, capsys):
    (images / "broken.jpg").unlink()
    out = tmp_path / "out"
    assert _explain([images], out, weights) == 0
    capsys.readouterr()
    assert _explain([images / "rgb.png"], out, weights, "--output", "probability") == 1
    assert "other settings (config differ)" in capsys.readouterr().err


def test_output_names_are_unique():
    paths = [
        Path("a/cat.jpg"),
        Path("b/cat.jpg"),
        Path("b/dog.jpg"),
        Path("b/deep/cat.png"),
        Path("c/owl.png"),
    ]
    assert output_names(paths) == {
        Path("a/cat.jpg"): "a__cat",
        Path("b/cat.jpg"): "b__cat",
        Path("b/dog.jpg"): "dog",
        Path("b/deep/cat.png"): "b__deep__cat",
        Path("c/owl.png"): "owl",
    }
    same_folder = [Path("x/owl.jpg"), Path("x/owl.png")]  # only the extension differs
    assert output_names(same_folder) == {Path("x/owl.jpg"): "owl.jpg", Path("x/owl.png"): "owl.png"}


def test_same_stems_from_different_directories(tmp_path, weights):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_noise(ord(folder[0]))).save(tmp_path / folder / "cat.png")
    out = tmp_path / "out"
    assert _explain([tmp_path / "one", tmp_path / "two"], out, weights, "--panel") == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["one__cat.png", "two__cat.png"]
    with Image.open(out / "one__cat.png") as png:
        assert png.size == (3 * 224 + 2 * 4, 224)  # image | heatmap | overlay


# ---------------------------------------------------------- method options and a test method


@config
class ProbeConfig(Config):
    steps: int = static(4)
    rule: Literal["left", "right"] = static("left")
    scale: float = static(1.0)
    normalise: bool = static(True)
    sigmas: tuple[float, ...] = static((1.0,))
    layer: str | None = static(None)
    nested: Any = static(None)  # no command-line form: keeps its default


@pytest.fixture
def probe_method(monkeypatch):
    """A registered method that records its config and divides each image by its mean, which
    gives NaN (0/0) for an all-black image."""
    seen = []

    def probe(model, images, targets=None, *, config=None, key=None):
        seen.append((config, key))
        return images / images.mean(axis=(1, 2, 3), keepdims=True)

    spec = MethodSpec("probe", probe, ProbeConfig, "test", saliency=maps.abs_sum, contrast=maps.Contrast())
    monkeypatch.setitem(method_base._METHODS, "probe", spec)
    return seen


def test_config_fields_become_options(images, tmp_path, weights, probe_method):
    options = [
        "--steps",
        "8",
        "--rule",
        "right",
        "--scale",
        "0.5",
        "--no-normalise",
        "--sigmas",
        "1",
        "2.5",
        "--layer",
        "x",
    ]
    assert _explain([images / "rgb.png"], tmp_path / "out", weights, "--method", "probe", *options) == 0
    # The method is called on the images (and first traced on abstract ones, to check the
    # settings on the model before any work): every call gets the options.
    assert probe_method and all(seen == probe_method[-1] for seen in probe_method)
    config, key = probe_method[-1]
    assert config == ProbeConfig(
        steps=8, rule="right", scale=0.5, normalise=False, sigmas=(1.0, 2.5), layer="x"
    )
    assert key is None  # a deterministic method gets no key


def test_option_choices_are_checked(images, tmp_path, weights, probe_method, capsys):
    assert (
        _explain([images / "rgb.png"], tmp_path / "out", weights, "--method", "probe", "--rule", "middle")
        == 2
    )
    assert "invalid choice: 'middle'" in capsys.readouterr().err


def test_an_option_of_another_method_is_a_clear_error(images, tmp_path, weights, probe_method, capsys):
    assert _explain([images / "rgb.png"], tmp_path / "out", weights, "--steps", "8") == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxattr explain: error: ") and len(err.strip().splitlines()) == 1
    assert (
        "saliency has no option --steps (an option of " in err
        and "probe" in err
        and "--multiply-by-inputs" in err
    )
    assert _explain([images / "rgb.png"], tmp_path / "out", weights, "--bogus") == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert (
        _explain([images / "rgb.png"], tmp_path / "out", weights, "--method", "probe", "--nested", "1") == 2
    )
    assert "unrecognized arguments: --nested" in capsys.readouterr().err


def test_non_finite_attributions_are_reported_and_not_written(tmp_path, weights, probe_method, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "black.png")
    Image.fromarray(_noise(5)).save(folder / "noise.png")
    out = tmp_path / "out"
    assert _explain([folder], out, weights, "--method", "probe") == 1
    assert "black.png: NaN or inf" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["noise.png"]
    assert _summary(out)["black"]["status"] == "non-finite"


def test_target_by_class_name(images, tmp_path, weights, probe_method, capsys):
    out = tmp_path / "out"
    assert _explain([images / "rgb.png"], out, weights, "--method", "probe", "--target", "Tabby") == 0
    assert _summary(out)["rgb"]["class_index"] == 281 and _summary(out)["rgb"]["label"] == "tabby"
    assert (
        _explain([images / "rgb.png"], tmp_path / "o2", weights, "--method", "probe", "--target", "1000") == 2
    )
    assert "out of range: resnet18 has 1000 classes" in capsys.readouterr().err
    assert _explain([images / "rgb.png"], tmp_path / "o3", weights, "--target", "tabbby") == 2
    assert "did you mean: tabby" in capsys.readouterr().err


def test_every_registered_method_gets_its_options():
    for method in list_methods():  # argparse raises if an option clashes with the CLI's own
        args = cli.build_parser(method).parse_args(["explain", "x", "--out", "o", "--method", method])
        assert args.method == method and not any(
            k.startswith("config:") for k in vars(args)
        )  # defaults stay put


def test_progress_bar():
    log = io.StringIO()
    progress = Progress(4, log)
    progress.advance(1)
    progress.note("hello")
    progress.advance(3)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[" + "." * 30 + "] 0/4 images") and "] 1/4 images" in lines[1]
    assert lines[2] == "hello" and lines[3].startswith("[" + "#" * 30 + "] 4/4 images")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress(2, terminal)
    progress.advance(2)
    assert (
        terminal.getvalue().count("\r\033[K") == 2 and terminal.getvalue().count("\n") == 1
    )  # one line, redrawn


def test_imagenet_labels_are_shipped():
    labels = imagenet_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert labels[0] == "tench" and labels[281] == "tabby" and labels[999] == "toilet tissue"


# --------------------------------------------------------------------------- bad input


def test_unknown_model_lists_the_choices(images, tmp_path, capsys):
    assert cli.main(["explain", str(images), "--model", "resnet19", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet19'" in err and "resnet18" in err


def test_unknown_method_lists_the_choices(images, tmp_path, capsys):
    assert cli.main(["explain", str(images), "--method", "magic", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and "saliency" in err


def test_missing_input_is_an_error(tmp_path, weights, capsys):
    assert _explain([tmp_path / "nowhere.jpg"], tmp_path / "o", weights) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_missing_weights_offline_say_which_file_goes_where(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXATTR_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "o"
    assert cli.main(["explain", str(images / "rgb.png"), "--model", "resnet18", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "torch") in err
    assert not out.exists()


# -------------------------------------------------------------------------------- models


def test_models_table_shows_weight_status(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["resnet18"][1:4] == ["resnet", "torchvision", "224"] and rows["resnet18"][-1] == "missing"
    assert set(rows) == set(list_models())
    cache_path("resnet18").parent.mkdir(parents=True)
    cache_path("resnet18").write_bytes(b"")
    assert cli.main(["models"]) == 0
    assert "cached" in next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("resnet18 ")
    )


# ------------------------------------------------------------------- convert, crosscheck


def test_convert_random_init_verify_passes_and_writes_loadable_weights(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "r18.safetensors"
    argv = [
        "convert",
        "resnet18",
        "--random-init",
        "--verify",
        "--image-size",
        "32",
        "--batch",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer4.1" in printed and "logits: max|diff|=" in printed and "parity ok" in printed
    assert create_model("resnet18", weights=out).name == "resnet18"


def test_convert_a_torch_checkpoint(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from converters.torch_models import from_torch, torch_model

    module = torch_model("resnet18")
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(module.state_dict(), checkpoint)
    out = tmp_path / "converted.safetensors"
    assert cli.main(["convert", "resnet18", "--weights", str(checkpoint), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    converted = create_model("resnet18", weights=out).params
    expected = from_torch("resnet18", module).params
    np.testing.assert_array_equal(converted["fc"]["kernel"], expected["fc"]["kernel"])
    np.testing.assert_array_equal(
        converted["layer1.0"]["bn1"]["running_var"], expected["layer1.0"]["bn1"]["running_var"]
    )


def test_convert_verify_exits_1_above_tolerance(monkeypatch, capsys):
    pytest.importorskip("torchvision")
    from converters import verify

    monkeypatch.setattr(verify, "LOGIT_RTOL", -1.0)  # no difference can pass
    assert (
        cli.main(["convert", "resnet18", "--random-init", "--verify", "--image-size", "32", "--batch", "1"])
        == 1
    )
    assert "parity FAILED in: logits" in capsys.readouterr().out


def test_convert_random_init_needs_something_to_do(capsys):
    assert cli.main(["convert", "resnet18", "--random-init"]) == 1
    assert "nothing to do" in capsys.readouterr().err


@pytest.fixture
def logits_reference(monkeypatch):
    """Test runners: the logits of both twins (agree), and a reference that cannot agree."""
    torch = pytest.importorskip("torch")
    from converters import crosscheck

    def logits(model, torch_model, images, targets):
        with torch.no_grad():
            theirs = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        return np.asarray(model(jnp.asarray(images))), theirs

    def disagree(model, torch_model, images, targets):
        return np.zeros(3), np.ones(3)

    crosscheck.references()  # registers the real runners first
    for name, runner in [("test_logits", logits), ("test_disagree", disagree)]:
        ref = crosscheck.Reference(name, runner, f"{name} reference", {"float32": 1e-4, "float64": 1e-10})
        monkeypatch.setitem(crosscheck._REFERENCES, name, ref)


def test_crosscheck_prints_the_comparison(logits_reference, tmp_path, capsys):
    argv = [
        "crosscheck",
        "test_logits",
        "--model",
        "resnet18",
        "--random-init",
        "--image-size",
        "32",
        "--batch",
        "1",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "vs test_logits reference" in out and "float32" in out
    value = float(out.split("max_rel_diff=")[1].split()[0])
    assert 0 <= value <= 1e-4 and "tolerance=1e-04" in out
    assert cli.main([*argv, "--dtype", "float64"]) == 0
    assert "float64" in capsys.readouterr().out


def test_crosscheck_on_image_files(logits_reference, images, capsys):
    files = [str(images / "rgb.png"), str(images / "grey.png")]
    argv = [
        "crosscheck",
        "test_logits",
        "--model",
        "resnet18",
        "--random-init",
        "--image-size",
        "32",
        "--images",
        *files,
    ]
    assert cli.main(argv) == 0
    assert "2 image files 32x32" in capsys.readouterr().out


def test_crosscheck_exits_1_above_tolerance(logits_reference, capsys):
    argv = [
        "crosscheck",
        "test_disagree",
        "--model",
        "resnet18",
        "--random-init",
        "--image-size",
        "32",
        "--batch",
        "1",
    ]
    assert cli.main(argv) == 1
    assert "max_rel_diff=1.000e+00 tolerance=1e-04 EXCEEDED" in capsys.readouterr().out


def test_crosscheck_unknown_method_lists_the_checkable_ones(logits_reference, capsys):
    assert cli.main(["crosscheck", "magic", "--model", "resnet18", "--random-init"]) == 1
    err = capsys.readouterr().err
    assert "no PyTorch reference for 'magic'" in err and "test_logits" in err


def test_crosscheck_options_configure_both_sides(monkeypatch, capsys):
    """--option FIELD=VALUE reaches the runner's config: at 4 riemann_right steps both sides agree
    (a side left at the defaults, 50 gausslegendre steps, would not); bad options are one line."""
    pytest.importorskip("captum")
    import dataclasses
    import functools

    from converters import crosscheck
    from jaxattr.cli import crosscheck as crosscheck_command

    real = crosscheck.references()["integrated_gradients"]
    seen = []

    @functools.wraps(real.runner)  # keeps the signature: the runner takes `config=`
    def spy(*args, **kwargs):
        seen.append(kwargs.get("config"))
        return real.runner(*args, **kwargs)

    monkeypatch.setitem(crosscheck._REFERENCES, "integrated_gradients", dataclasses.replace(real, runner=spy))
    argv = ["crosscheck", "integrated_gradients", "--model", "resnet18", "--random-init", "--image-size", "32", "--batch", "1"]
    assert cli.main([*argv, "--option", "steps=4", "--option", "rule=riemann_right"]) == 0
    out = capsys.readouterr().out
    assert "1 random image 32x32, steps=4 rule=riemann_right, vs captum" in out and out.rstrip().endswith(" ok")
    assert [(c.steps, c.rule) for c in seen] == [(4, "riemann_right")]
    for method, bad, message in [
        ("integrated_gradients", "steps=0", "argument --option steps: steps must be an integer in [1, 1000000], got 0"),
        ("integrated_gradients", "nope=1", "integrated_gradients has no option nope; options: steps, rule,"),
        ("integrated_gradients", "rule=bogus", "argument --option rule=bogus: expected one of gausslegendre,"),
        ("integrated_gradients", "steps", "expected FIELD=VALUE (e.g. steps=8), got 'steps'"),
        ("gradcam", "relu=false", "the gradcam reference compares the method's defaults only"),
    ]:
        assert cli.main([*argv[:1], method, *argv[2:], "--option", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert len(seen) == 1
    # The fields change the config the runner compares at, here IG2's (every reference), not the method's defaults.
    default, chosen = crosscheck_command._configured(crosscheck.references()["ig2"], ["steps=3"])
    assert (chosen.config.steps, chosen.config.selection, chosen.config.num_references) == (3, "all", None)
    assert default.config == dataclasses.replace(chosen.config, steps=default.config.steps)


# ---------------------------------------------------------------------------- no torch


def test_explain_runs_without_torch_and_convert_says_what_to_install(tmp_path, weights):
    image = tmp_path / "cat.png"
    Image.fromarray(_noise(7)).save(image)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # every `import torch` now fails
        from jaxattr.cli import main
        rc = main(["explain", {str(image)!r}, "--model", "resnet18", "--weights", {str(weights)!r},
                   "--out", {str(tmp_path / "out")!r}])
        assert rc == 0, rc
        assert main(["convert", "resnet18", "--random-init", "--verify"]) == 1
        """
    )
    env = {**os.environ, "JAXATTR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'jaxattr[torch]'" in done.stderr
    assert (tmp_path / "out" / "cat.png").is_file() and (tmp_path / "out" / "cat.npy").is_file()


def test_extra_outputs_are_saved_beside_the_map_and_resumed(images, tmp_path, weights, monkeypatch):
    """A method's extras (MethodSpec.extras, e.g. I-GOS's masks) become <name>.<extra>.npy, written
    with the map and skipped with it on a re-run."""

    def probe(model, images, targets=None, *, config=None, key=None):
        return images

    def with_cells(model, images, targets=None, *, config=None, key=None):
        return images, {"cells": images[:, ::8, ::8, 0]}

    spec = MethodSpec("probe", probe, ProbeConfig, "test", saliency=maps.abs_sum, contrast=maps.Contrast(), extras=with_cells)
    monkeypatch.setitem(method_base._METHODS, "probe", spec)
    (images / "broken.jpg").unlink()
    out = tmp_path / "out"
    assert _explain([images], out, weights, "--method", "probe") == 0
    for name in ("grey", "rgb", "rgba", "sixteen"):
        image = load_image(images / f"{name}.png", model_info("resnet18"))
        np.testing.assert_array_equal(np.load(out / f"{name}.cells.npy"), image[::8, ::8, 0])
    first = _mtimes(out)
    assert _explain([images], out, weights, "--method", "probe") == 0
    assert _mtimes(out) == first and len(first) == 12


# The display contrast of each method, as its authors' code draws its maps. PAIR's grayscale
# visualisation (saliency, SmoothGrad, IG, Guided IG, Blur IG; guided backprop and IG2 drawn the same
# way) clips at the 99th percentile above the map's minimum; Grad-CAM, IIA and the I-GOS masks are
# min-max scaled. GNL divides its absolute map by the maximum; jaxattr scales from zero to the 99th
# percentile, deliberately (the raw maximum is one dot on a real model).
CONTRASTS = {
    "saliency": ("min", 99.0),
    "smoothgrad": ("min", 99.0),
    "integrated_gradients": ("min", 99.0),
    "guided_backprop": ("min", 99.0),
    "guided_ig": ("min", 99.0),
    "blur_ig": ("min", 99.0),
    "ig2": ("min", 99.0),
    "gnl_ig": ("zero", 99.0),
    "gradcam": ("min", 100.0),
    "iia": ("min", 100.0),
    "igos": ("min", 100.0),
    "igos_plus": ("min", 100.0),
    "igos_pp": ("min", 100.0),
}


def test_each_methods_display_contrast():
    assert {m: (method_spec(m).contrast.floor, method_spec(m).contrast.percentile) for m in list_methods()} == CONTRASTS


def test_the_png_is_drawn_with_the_methods_contrast(tmp_path, weights):
    """The heat-map tile of --panel is the map scaled by GNL-IG's contrast, to the PNG's rounding."""
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    argv = ["explain", str(tmp_path / "im.png"), "--model", "resnet18", "--weights", str(weights), "--crop", "32",
            "--method", "gnl_ig", "--steps", "4", "--panel", "--out", str(tmp_path / "out"), "--no-compile-cache"]
    assert cli.main(argv) == 0
    saliency_map = np.asarray(method_spec("gnl_ig").saliency(jnp.asarray(np.load(tmp_path / "out" / "im.npy"))[None]))[0]
    floor, percentile = CONTRASTS["gnl_ig"]
    heat = jaxattr.viz.contrast(saliency_map, Contrast(floor, percentile))
    tile = np.asarray(Image.open(tmp_path / "out" / "im.png"))[:, 32 + 4 : 64 + 4]
    np.testing.assert_array_equal(tile, jaxattr.viz.to_uint8(jaxattr.viz.colorize(heat, (32, 32))))
