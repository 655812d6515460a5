"""`jaxattr explain` used as a hostile or careless user would: every case ends with the exit status
it should, one line on stderr saying what went wrong, no traceback, and nothing lost (each image
finished before a failure keeps its outputs and its summary record).

Cases: bad values of every option (three per option of every method, generated from the config
fields, and of the command's own options), the hostile image corpus of tests/test_hostile_inputs.py
run through the command line, output directories that cannot be written or would overwrite
inputs, a full disk, resumes over damaged outputs, long and undecodable names, concurrent runs
into one directory, and SIGINT (twice), SIGTERM and kill -9 followed by a resume that gives
bit-identical outputs. Most cases run in-process through `jaxattr.cli.main`; signals, the
corpus (FIFOs, devices) and concurrency run in child processes that share a compilation cache.
The model is a random-init ResNet-18 at 32x32 (`--crop 32`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxattr.viz
from jaxattr import cli, run as run_module
from jaxattr.cli._common import config_option, config_options, flag
from jaxattr.methods import list_methods
from jaxattr.models import create_model
from jaxattr.models.weights import save_params

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "resnet18", "--crop", "32"]  # the model runs at 32x32 (resize 36, crop 32)
MAIN = "from jaxattr.cli import entry; entry()"  # the `jaxattr` program


# ------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_params(path, create_model("resnet18", weights=None).params, model="resnet18")
    return path


@pytest.fixture(scope="module")
def child_env(tmp_path_factory) -> dict[str, str]:
    """Child processes: this checkout first, offline, one persistent compilation cache, and the
    matmul precision of this process (tests/conftest.py), so their maps equal in-process ones."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAXATTR_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "JAXATTR_HOME": str(tmp_path_factory.mktemp("jaxattr-home")),  # explain's compile cache
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _noise(seed: int, shape=(24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _images(folder: Path, n: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{prefix}{i:02d}.png")
        Image.fromarray(_noise(i)).save(paths[-1])
    return paths


class Result:
    def __init__(self, status: int, out: str, err: str):
        self.status, self.out, self.err = status, out, err

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"Result(status={self.status}, err={self.err[-2000:]!r})"


def explain(inputs, out, weights, *extra, method: str = "saliency", small: list[str] = SMALL) -> Result:
    """`jaxattr explain` in this process, its output captured."""
    argv = ["explain", *map(os.fsdecode, inputs), *small, "--weights", str(weights), "--out", os.fsdecode(out)]
    return main([*argv, "--method", method, *extra])


def main(argv: list[str]) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return Result(status, out.getvalue(), err.getvalue())


def assert_one_line_error(result: Result, status: int, *needles: str) -> None:
    """Exit `status`, no traceback, and the error is one `jaxattr...: error:` line naming `needles`."""
    assert result.status == status, result
    assert "Traceback" not in result.err, result
    errors = [line for line in result.lines if ": error: " in line]
    assert len(errors) == 1, result
    assert errors[0] == result.lines[-1], result  # the last thing said
    for needle in needles:
        assert needle in errors[0], (needle, result)


def summary(out: Path) -> dict[str, dict]:
    return {r["output"]: r for r in json.loads((out / "summary.json").read_text())["images"]}


def finished(out: Path) -> set[str]:
    """Output names with both files present."""
    return {p.stem for p in out.glob("*.png")} & {p.stem for p in out.glob("*.npy")}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name.endswith(".tmp")]


def assert_nothing_lost(out: Path, *, killed: bool = False) -> None:
    """Every image with both outputs has an 'explained' record, and no temporary file is left
    (kill -9 may leave some: the next run removes them)."""
    records = summary(out)
    for name in finished(out):
        assert records.get(name, {}).get("status") == "explained", (name, records.get(name))
    assert killed or not temporaries(out)


def child(argv: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", MAIN, *argv],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# ------------------------------------------------------------ options: three bad values each


def _bad_values(name: str, spec: dict) -> list[list[str]]:
    """Three wrong ways to give config field `name` (argparse keywords `spec`), as typed."""
    option = flag(name)
    if spec.get("action") is not None:  # --flag / --no-flag take no value
        return [[f"{option}=yes"], [f"{option}=1"], [f"--no-{option[2:]}=0"]]
    if "choices" in spec:
        first = str(spec["choices"][0])
        return [[option, "bogus"], [option, ""], [option, first.upper() if first.upper() != first else first + "x"]]
    if "help_choices" in spec:  # --base METHOD
        return [[option, "bogus"], [option, "smoothgrad"], [option, ""]]
    if spec.get("nargs") == "+":
        return [[option, "abc"], [option, "nan"], [option]]
    if spec["type"] is int:
        return [[option, "abc"], [option, "2.5"], [option, "-1"]]
    if spec.get("metavar") == "N|auto|all":  # a chunk
        return [[option, "0"], [option, "AUTO"], [option, ""]]
    if spec["type"] is float:
        return [[option, "abc"], [option, "nan"], [option, "inf"]]
    return [[option, "nosuch"], [option, ""], [option, "fc.kernel"]]  # names (layers), checked on the model


METHOD_OPTION_CASES = [
    pytest.param(method, argv, id=f"{method}{' '.join(argv)}")
    for method in list_methods()
    for name, spec, _ in config_options(method)
    for argv in _bad_values(name, spec)
]

OWN_OPTION_CASES = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "4294967296"], "--seed"),
    (["--seed", "x"], "--seed"),
    (["--alpha", "nan"], "--alpha"),
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "abc"], "--alpha"),
    (["--target", "1000"], "--target"),
    (["--target", "-1"], "--target"),
    (["--target", "Cardigans"], "--target"),
    (["--target", "CARDIGAN"], "ambiguous"),
    (["--model", "resnet19"], "--model"),
    (["--model", ""], "--model"),
    (["--model", "RESNET18"], "--model"),
    (["--method", "magic"], "--method"),
    (["--method", ""], "--method"),
    (["--method", "SALIENCY"], "--method"),
    (["--resize", "0"], "--resize"),
    (["--resize", "abc"], "--resize"),
    (["--resize", "1000000"], "--resize"),
    (["--crop", "0"], "--crop"),
    (["--crop", "-5"], "--crop"),
    (["--crop", "x"], "--crop"),
    (["--no-crop", "--crop", "8"], "--crop"),
    (["--interpolation", "nearest"], "--interpolation"),
    (["--interpolation", ""], "--interpolation"),
    (["--interpolation", "BILINEAR"], "--interpolation"),
    (["--bogus"], "--bogus"),
    (["--steps", "4"], "--steps"),  # an option of another method
    # Counts of model calls past a million are refused as typos, before any estimate or allocation.
    (["--method", "integrated_gradients", "--steps", "1000000000"], "in [1, 1000000]"),
    (["--method", "blur_ig", "--steps", "1000000000"], "in [1, 1000000]"),
    (["--method", "smoothgrad", "--samples", "1000000000"], "in [1, 1000000]"),
    (["--method", "guided_ig", "--steps", "1000000000"], "in [1, 1000000]"),
    # Within the bound, what cannot fit in memory is refused with the estimate and what makes it.
    (["--method", "integrated_gradients", "--chunk", "1", "--steps", "1000000"], "tables its settings size"),  # Gauss-Legendre's
    (["--method", "integrated_gradients", "--rule", "riemann_trapezoid", "--chunk", "1000000", "--steps", "1000000"], "needs about"),
    (["--out", ""], "--out: expected a directory, got an empty path"),
    (["--crop", "100000"], "--crop: 100000 resizes images to"),
]


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("one"), 1)[0]


@pytest.mark.parametrize("method, argv", METHOD_OPTION_CASES)
def test_a_bad_method_option_is_one_line_exit_2(method, argv, one_image, weights, tmp_path):
    out = tmp_path / "out"
    result = explain([one_image], out, weights, *argv, method=method)
    assert_one_line_error(result, 2)
    # The message names the flag, or the value where the model refused it (an unknown layer).
    assert argv[0].split("=")[0] in result.lines[-1] or f"'{argv[-1]}'" in result.lines[-1], result
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("argv, needle", OWN_OPTION_CASES, ids=[" ".join(a) for a, _ in OWN_OPTION_CASES])
def test_a_bad_command_option_is_one_line_exit_2(argv, needle, one_image, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXATTR_MEMORY_BUDGET", "8G")  # the refusals of huge sizes do not depend on this machine
    out = tmp_path / "out"
    result = explain([one_image], out, weights, *argv)
    assert_one_line_error(result, 2, needle)
    assert not out.exists()


def test_option_case_count():
    assert len(METHOD_OPTION_CASES) == 3 * sum(len(config_options(m)) for m in list_methods())
    assert len(METHOD_OPTION_CASES) + len(OWN_OPTION_CASES) >= 100


def test_usage_errors_without_inputs_or_output(one_image, weights, tmp_path):
    assert_one_line_error(main(["explain", str(one_image)]), 2, "--out")
    assert_one_line_error(main(["explain", "--out", str(tmp_path / "o")]), 2, "IMAGES_OR_DIRS")
    assert_one_line_error(main([]), 2)
    assert_one_line_error(main(["frobnicate"]), 2, "frobnicate")


def test_weights_that_are_not_weights(one_image, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for weights, needle in [(tmp_path / "missing.pth", "missing.pth"), (tmp_path, str(tmp_path)), (garbage, "garbage.pth")]:
        out = tmp_path / "out"
        assert_one_line_error(explain([one_image], out, weights), 1, needle)
        assert not out.exists()


def test_target_names_are_case_sensitive_first(one_image, weights, tmp_path):
    assert explain([one_image], tmp_path / "a", weights, "--target", "cardigan").status == 0
    assert explain([one_image], tmp_path / "b", weights, "--target", "Cardigan").status == 0
    assert summary(tmp_path / "a")["img00"]["class_index"] == 474
    assert summary(tmp_path / "b")["img00"]["class_index"] == 264
    result = explain([one_image], tmp_path / "c", weights, "--target", "CARDIGAN")
    assert "'Cardigan' (264)" in result.err and "'cardigan' (474)" in result.err


def test_help_shows_metavars_and_choices():
    result = main(["explain", "--method", "integrated_gradients", "--help"])
    assert result.status == 0
    text = " ".join(result.out.split())
    assert "--steps N" in text and "CONFIG:" not in text
    assert "--rule {gausslegendre,gausslegendre64,riemann_left,riemann_right,riemann_middle,riemann_trapezoid,pair,igos}" in text
    assert "--baseline {black,mean,blur,uniform}" in text
    assert "--resize N" in text and "--no-crop" in text and "--interpolation {bilinear,bicubic}" in text


@pytest.mark.parametrize("method", ["integrated_gradients", "gnl_ig", "blur_ig", "smoothgrad"])
def test_chunk_takes_a_size_auto_or_all(method):
    values = {text: config_option(method, "chunk", text, f"chunk={text}")[0] for text in ("4", "auto", "all")}
    assert values == {"4": 4, "auto": "auto", "all": None}  # all: None, everything at once
    assert dict((name, default) for name, _, default in config_options(method))["chunk"] == "auto"


def test_uniform_baseline_draws_per_file_keys(weights, tmp_path):
    """A method whose config asks for randomness takes a key like a stochastic one: per file, from
    --seed, so the same image gives the same map alone or in a batch, and another seed another."""
    paths = _images(tmp_path / "in", 3)
    options = ["--steps", "2", "--baseline", "uniform", "--batch-size", "2"]  # one compiled shape: batches of 2
    # img01 beside img00 (batch 1 of 3 images), then beside img02: the same map; another seed: another.
    for out, inputs, seed in [("together", paths, "3"), ("alone", paths[1:], "3"), ("other", paths[1:], "4")]:
        assert explain(inputs, tmp_path / out, weights, *options, "--seed", seed, method="integrated_gradients").status == 0
    together, alone, other = (np.load(tmp_path / d / "img01.npy") for d in ("together", "alone", "other"))
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6 * np.abs(alone).max())
    assert not np.allclose(other, alone)
    settings = json.loads((tmp_path / "alone" / "summary.json").read_text())["settings"]
    assert settings["seed"] == 3 and settings["config"]["baseline"] == "uniform"
    # Resuming with another seed would mix maps of two seeds in one directory: refused, nothing touched.
    before = {p.name: p.read_bytes() for p in (tmp_path / "alone").iterdir()}
    resumed = explain(paths, tmp_path / "alone", weights, *options, "--seed", "4", method="integrated_gradients")
    assert_one_line_error(resumed, 1, "holds outputs of a run with other settings (seed differ)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "alone").iterdir()} == before


def test_preprocessing_options_are_applied_and_recorded(weights, tmp_path):
    (path,) = _images(tmp_path / "in", 1)
    for argv, expected in [
        (["--no-crop", "--resize", "40"], {"resize": 40, "crop": None, "interpolation": "bilinear"}),
        (["--resize", "48", "--crop", "40", "--interpolation", "bicubic"], {"resize": 48, "crop": 40, "interpolation": "bicubic"}),
    ]:
        out = tmp_path / "-".join(argv)
        assert explain([path], out, weights, *argv, small=["--model", "resnet18"]).status == 0
        assert json.loads((out / "summary.json").read_text())["settings"]["preprocessing"] == expected
        size = expected["crop"] or expected["resize"]
        assert np.load(out / "img00.npy").shape == (size, size, 3)


# ------------------------------------------------------------------------------- outputs


def test_output_path_that_is_a_file_or_under_one(one_image, weights, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    assert_one_line_error(explain([one_image], file, weights), 1, "is a file")
    assert_one_line_error(explain([one_image], file / "sub", weights), 1, "is a file")
    assert file.read_text() == "x"


def test_output_directory_equal_to_an_input_directory_is_refused(weights, tmp_path):
    folder = tmp_path / "photos"
    _images(folder, 2)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert_one_line_error(explain([folder], folder, weights), 1, "is an input directory")
    assert_one_line_error(explain([folder], folder / ".." / "photos", weights), 1, "is an input directory")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing overwritten


def test_an_input_named_like_an_output_is_not_overwritten(weights, tmp_path):
    out = tmp_path / "out"
    (image,) = _images(out, 1)
    before = image.read_bytes()
    assert_one_line_error(explain([image], out, weights), 1, "would be overwritten")
    assert image.read_bytes() == before
    jpeg = out / "photo.jpg"  # outputs photo.png / photo.npy: no input among them
    Image.fromarray(_noise(3)).save(jpeg)
    assert explain([jpeg], out, weights).status == 0 and (out / "photo.png").is_file()


def test_output_directory_inside_an_input_directory(weights, tmp_path):
    """Outputs in a subdirectory cannot collide with the inputs; a recursive scan leaves it out."""
    folder = tmp_path / "photos"
    _images(folder, 2)
    out = folder / "maps"
    assert explain([folder], out, weights, "--recursive").status == 0
    assert finished(out) == {"img00", "img01"}
    again = explain([folder], out, weights, "--recursive")  # the maps are not new inputs
    assert again.status == 0 and "2 of 2 images already have outputs" in again.err
    assert set(summary(out)) == {"img00", "img01"}


def test_read_only_output_directory(one_image, weights, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(run_module.os, "access", lambda *a, **k: False)  # root ignores permission bits
    assert_one_line_error(explain([one_image], out, weights), 1, "cannot write into the output directory")
    assert list(out.iterdir()) == []


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    if not _mount_tmpfs(path, options):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_read_only_file_system(one_image, weights, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        assert_one_line_error(explain([one_image], ro / "out", weights), 1, "read-only file system")


def test_disk_full_mid_run_keeps_the_finished_images(weights, tmp_path, monkeypatch):
    """The writer fails with ENOSPC on the 5th output file (the 3rd image): the run stops with one
    line, and the two images finished before keep their outputs and records."""
    paths = _images(tmp_path / "in", 4)
    out = tmp_path / "out"
    real, calls = jaxattr.viz.write_atomically, []

    def full_after_four(path, write):
        if Path(path).name.startswith("img"):  # the summary's writes (interleaved with the
            calls.append(path)                  # pipeline's background writes) still succeed
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, write)

    monkeypatch.setattr(jaxattr.viz, "write_atomically", full_after_four)
    result = explain(paths, out, weights, "--batch-size", "4")
    assert_one_line_error(result, 1, "No space left on device", "img02")
    assert finished(out) == {"img00", "img01"} and set(summary(out)) == {"img00", "img01"}
    assert_nothing_lost(out)
    monkeypatch.setattr(jaxattr.viz, "write_atomically", real)
    assert explain(paths, out, weights).status == 0 and set(summary(out)) == {f"img{i:02d}" for i in range(4)}


def test_a_real_full_disk(weights, tmp_path):
    """A 64 KiB tmpfs holds a few 32x32 outputs (12 KiB .npy each), then ENOSPC."""
    paths = _images(tmp_path / "in", 8)
    with tmpfs(tmp_path / "small", "size=64k") as small:
        out = small / "out"
        result = explain(paths, out, weights, "--batch-size", "2")
        assert_one_line_error(result, 1, "No space left on device")
        assert 0 < len(finished(out)) < 8
        assert_nothing_lost(out)


def test_resume_recomputes_damaged_or_half_outputs(weights, tmp_path):
    paths = _images(tmp_path / "in", 5)
    out = tmp_path / "out"
    assert explain(paths, out, weights).status == 0
    reference = {p.name: p.read_bytes() for p in out.glob("img*")}
    (out / "img00.png").unlink()  # a lone .npy is not done
    (out / "img01.npy").unlink()  # nor a lone .png
    (out / "img02.npy").write_bytes(reference["img02.npy"][:100])  # a .npy cut short
    (out / "img03.png").write_bytes(reference["img03.png"][:50])  # a PNG cut short
    untouched = (out / "img04.npy").stat().st_mtime_ns
    result = explain(paths, out, weights)
    assert result.status == 0 and "1 of 5 images already have outputs" in result.err, result
    assert {p.name: p.read_bytes() for p in out.glob("img*")} == reference
    assert (out / "img04.npy").stat().st_mtime_ns == untouched
    assert {r["status"] for r in summary(out).values()} == {"explained"}


def test_long_and_undecodable_names(weights, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = [b"n" * 251 + b".png", "é".encode() * 125 + b"x.png", b"bad\xff\xfe.png", b"new\nline.png", b"\x1b[31mred.png"]
    for i, name in enumerate(names):
        Image.fromarray(_noise(i)).save(os.path.join(os.fsencode(folder), name), format="PNG")
    out = tmp_path / "out"
    result = explain([folder], out, weights, "--batch-size", "3")
    assert result.status == 0, result
    records = summary(out)
    assert len(records) == len(names) == len(finished(out))
    assert {os.fsencode(r["file"]) for r in records.values()} == {os.fsencode(folder) + b"/" + n for n in names}
    for name in records:
        assert len(name.encode()) <= run_module.MAX_NAME_BYTES and name.isprintable(), name
    assert "\x1b" not in result.out and "\\x1b" in result.out  # the table escapes control characters
    csv_bytes = (out / "summary.csv").read_bytes()
    assert b"bad\xff\xfe.png" in csv_bytes  # the CSV holds the file system's bytes
    again = explain([folder], out, weights)  # the shortened names are stable: all done
    assert again.status == 0 and f"{len(names)} of {len(names)} images already have outputs" in again.err


def test_one_bad_file_does_not_stop_the_batch(weights, tmp_path, monkeypatch):
    """A FIFO, an unreadable directory, a 1x40000 strip and a corrupt file among good images: each
    is reported on one line and recorded; the good ones are explained; the summary holds all."""
    folder = tmp_path / "in"
    _images(folder, 3)
    os.mkfifo(folder / "fifo.png")
    (folder / "locked").mkdir()
    Image.fromarray(np.zeros((40_000, 1), np.uint8)).save(folder / "strip.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    real = os.scandir

    def scandir(path):  # root reads any directory: deny this one as chmod 000 would
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    result = explain([folder], out, weights, "--recursive", "--batch-size", "2")
    assert result.status == 1 and "Traceback" not in result.err, result
    records = summary(out)
    assert {n for n, r in records.items() if r["status"] == "explained"} == {"img00", "img01", "img02"}
    for name, reason in [("fifo", "FIFO"), ("locked", "cannot read directory"), ("strip", "exceeds the limit"), ("broken", "not an image")]:
        assert records[name]["status"] == "unreadable" and reason in records[name]["message"], records[name]
        assert any(reason in line for line in result.lines), (reason, result)
    assert_nothing_lost(out)


# -------------------------------------------------------------------- library boundary errors


def test_library_boundary_errors():
    """Wrong inputs at the API give ValueError/TypeError saying what to do, before any tracing."""
    import jax
    import jax.numpy as jnp

    import jaxattr
    from test_methods_contract import tiny_model

    model, x = tiny_model(), jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), np.float32))
    cases = [
        (lambda: jaxattr.explain(model, x, "saliency", targets=10), ValueError, r"class indices in \[0, 9\], got 10"),
        (lambda: jaxattr.saliency(model, x, jnp.array([1, -1])), ValueError, "got -1"),
        (lambda: jaxattr.saliency(model, x, jnp.array([1, 2, 3])), ValueError, r"shape \(2,\)"),
        (lambda: jaxattr.saliency(model, x, jnp.array([1.0, 2.0])), TypeError, "integer class indices"),
        (lambda: jaxattr.saliency(model, x * 255), ValueError, "divide it by 255"),
        (lambda: jaxattr.saliency(model, (x - 0.45) / 0.22), ValueError, "normalised images"),
        (lambda: jaxattr.saliency(model, x.at[0, 1, 2, 0].set(jnp.nan)), ValueError, "1 image values are NaN"),
        (lambda: jaxattr.saliency(model, x.at[1, 1, 2, 0].set(jnp.inf)), ValueError, "NaN or infinite"),
        (lambda: jaxattr.integrated_gradients(model, x, config={"steps": 4}), TypeError, r"IntegratedGradientsConfig\(\*\*options\)"),
        (lambda: jaxattr.explain(model, x, "integrated_gradients", config={"steps": 4}), TypeError, "got dict"),
        (lambda: jaxattr.explain(model, x, "saliency", devices="cpu"), TypeError, "jax.local_devices"),
        (lambda: jaxattr.explain(model, x, "saliency", devices=["cpu"]), TypeError, "jax.Device objects"),
        (lambda: jaxattr.smoothgrad(model, x, key=0), TypeError, r"jax.random.key\(seed\)"),
        (lambda: jaxattr.explain(model, x, "smoothgrad", key=7, samples=2), TypeError, "an int is a seed"),
        (lambda: jaxattr.saliency(model, x, key=jnp.zeros((2, 2), jnp.uint32)), TypeError, "jax.random key"),
        (lambda: jaxattr.explain(model, x, "integrated_gradients", baseline="uniform"), ValueError, "pass key="),
        (lambda: jaxattr.saliency(model, x[:0]), ValueError, "empty batch"),
        (lambda: jaxattr.saliency(model, x[0]), ValueError, r"images\[None\]"),
    ]
    for call, kind, pattern in cases:
        with pytest.raises(kind, match=pattern):
            call()
    # What keeps working: raw keys, typed keys per image, values a little outside [0, 1].
    assert jaxattr.saliency(model, x, key=jax.random.PRNGKey(0)).shape == x.shape
    assert jaxattr.smoothgrad(model, x * 1.2 - 0.1, key=jax.random.split(jax.random.key(0), 2), config=jaxattr.SmoothGradConfig(samples=2)).shape == x.shape


# ------------------------------------------------------------- children: corpus, concurrency


def test_hostile_corpus_through_the_command_line(weights, child_env, tmp_path):
    """The image corpus of tests/test_hostile_inputs.py (corrupt, truncated, lying headers,
    bombs, FIFOs, sockets, devices, link loops, odd names), given explicitly and scanned
    recursively, in one run: every file gets a record saying what the library says of it, the
    run ends with exit 1 (some failed) and no traceback, and nothing hangs."""
    from test_hostile_inputs import EITHER, FAILS, LOADS, _corpus

    root, cases, tree = _corpus()
    # A missing input refuses the whole run (tested above); directories given are scanned.
    refused = {"missing", "path-through-a-file", "directory", "directory-named-png"}
    explicit = [case["path"] for name, case in cases.items() if name not in refused]
    out = tmp_path / "out"
    argv = ["explain", *explicit, os.fsencode(root), *SMALL, "--weights", str(weights), "--out", str(out),
            "--recursive", "--batch-size", "16", "--method", "saliency"]
    proc = child(argv, child_env)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    err = stderr.decode(errors="replace")
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    listed = {os.fsencode(r["file"]): r for r in summary(out).values()}
    records = {os.path.realpath(path): r for path, r in listed.items()}
    # Size-dependent cases: refused at the library's 224 px, loadable at this run's 32 px.
    at_32px = {"png-1x32768-preprocessed": LOADS}
    checked = 0
    for name, case in cases.items():
        if name in refused:
            continue
        # Listed as given, or as the first path reaching the same file (a link to valid.png).
        record = listed.get(case["path"]) or records.get(os.path.realpath(case["path"]))
        assert record is not None, name
        outcome = at_32px.get(name, case["outcome"])
        if record["status"] == "explained":
            assert outcome in (LOADS, EITHER), (name, record)
            assert (out / f"{record['output']}.png").is_file() and (out / f"{record['output']}.npy").is_file()
        else:
            assert outcome in (FAILS, EITHER) and record["status"] == "unreadable", (name, record)
            assert "\n" not in record["message"]
        checked += 1
    assert checked >= 150, checked
    # The recursive scan: what it found has records, what it skipped too.
    scan = tree["scan"]
    for pattern in tree["skipped"]:
        assert any(r["status"] == "unreadable" and re.search(pattern, f"{Path(r['file']).name}: {r['message']}")
                   for r in listed.values() if str(scan) in r["file"]), pattern
    assert_nothing_lost(out)
    names = [r["output"] for r in records.values()]
    assert len(names) == len(set(names)) and all(len(n.encode()) <= run_module.MAX_NAME_BYTES for n in names)


def test_concurrent_runs_into_one_directory_lose_no_record(weights, child_env, tmp_path):
    """Two processes, 10 images each, batches of 1 (a summary merge per image), one output
    directory: 20 records."""
    runs = []
    out = tmp_path / "out"
    for prefix in ("a", "b"):
        paths = _images(tmp_path / prefix, 10, prefix=prefix)
        argv = ["explain", *map(str, paths), *SMALL, "--weights", str(weights), "--out", str(out),
                "--batch-size", "1", "--method", "saliency"]
        runs.append(child(argv, child_env))
    for proc in runs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0 and b"Traceback" not in stderr, stderr.decode(errors="replace")[-3000:]
    records = summary(out)
    assert len(records) == 20 and len(finished(out)) == 20
    assert sum(1 for line in (out / "summary.csv").read_text().splitlines()) == 21


# --------------------------------------------------------------------------- interrupts


INTERRUPT_ARGS = ["--batch-size", "1", "--steps", "8"]
INTERRUPT_METHOD = "integrated_gradients"


@pytest.fixture(scope="module")
def interrupted_inputs(tmp_path_factory) -> list[Path]:
    return _images(tmp_path_factory.mktemp("interrupted"), 16)


@pytest.fixture(scope="module")
def uninterrupted(interrupted_inputs, weights, tmp_path_factory) -> Path:
    """The outputs of an uninterrupted run (in this process, which compiles what the resumes run)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = explain(interrupted_inputs, out, weights, *INTERRUPT_ARGS, method=INTERRUPT_METHOD)
    assert result.status == 0, result
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("img*"))}


@pytest.mark.parametrize("how", ["SIGINT twice", "SIGTERM", "kill -9"])
def test_interrupt_then_resume_gives_identical_outputs(how, interrupted_inputs, uninterrupted, weights, child_env, tmp_path):
    out = tmp_path / "out"
    argv = ["explain", *map(str, interrupted_inputs), *SMALL, "--weights", str(weights), "--out", str(out),
            "--method", INTERRUPT_METHOD, *INTERRUPT_ARGS]
    proc = child(argv, child_env)
    try:
        wait_for(lambda: (out / "summary.json").exists())  # the first image is done
        if how == "kill -9":
            proc.kill()
        elif how == "SIGTERM":
            proc.terminate()
        else:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
            proc.send_signal(signal.SIGINT)  # impatient: the second Ctrl-C must not break the exit
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = stderr.decode(errors="replace")
    expected = {"SIGINT twice": 130, "SIGTERM": 143, "kill -9": -signal.SIGKILL}[how]
    assert proc.returncode == expected, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if how != "kill -9":
        assert err.strip().splitlines()[-1].startswith("jaxattr: interrupted"), err[-1000:]
    done = finished(out)
    assert 0 < len(done) < len(interrupted_inputs), "the run was not interrupted halfway"
    assert_nothing_lost(out, killed=how == "kill -9")
    resumed = explain(interrupted_inputs, out, weights, *INTERRUPT_ARGS, method=INTERRUPT_METHOD)
    assert resumed.status == 0, resumed
    assert _outputs(out) == _outputs(uninterrupted)  # bit-identical
    assert len(summary(out)) == len(interrupted_inputs)
    assert not temporaries(out)


def _records(out: Path) -> int:
    return len(summary(out)) if (out / "summary.json").exists() else 0  # written atomically


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_stops_the_run_during_a_batch(signum, status, weights, child_env, tmp_path):
    """A batch is one XLA call, native code in which Python runs no signal handler: the signal must
    still end the run at once, abandoning the batch, not when the batch is done. Three images,
    one per batch: the second batch's time is the yardstick, the signal comes a quarter of the
    way into the third, and the run must end within half a batch's time (waiting for the batch
    would take three quarters). The two finished images keep their records; a re-run resumes."""
    paths = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    argv = ["explain", *map(str, paths), *SMALL, "--weights", str(weights), "--out", str(out),
            "--method", INTERRUPT_METHOD, "--batch-size", "1", "--steps", "1024"]  # a batch long beside exiting (~0.1 s)
    proc = child(argv, child_env)
    try:
        done_at = []
        for n in (1, 2):
            wait_for(lambda: _records(out) >= n)
            done_at.append(time.monotonic())
        batch_seconds = done_at[1] - done_at[0]
        time.sleep(batch_seconds / 4)
        assert proc.poll() is None and _records(out) == 2, "the third batch ended too soon to be interrupted"
        sent = time.monotonic()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    err = stderr.decode(errors="replace")
    assert proc.returncode == status and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("jaxattr: interrupted"), err[-1000:]
    assert took < batch_seconds / 2, f"exited {took:.2f}s after the signal; a batch takes {batch_seconds:.2f}s"
    assert set(summary(out)) == finished(out) == {"img00", "img01"}
    assert_nothing_lost(out)
    if signum == signal.SIGINT:  # one resume is enough: the resumes above check the outputs
        resumed = child(argv, child_env)
        stdout, stderr = resumed.communicate(timeout=300)
        said = (stdout + stderr).decode(errors="replace")
        assert resumed.returncode == 0 and "1 explained, 2 already done" in said, said[-3000:]
        assert set(summary(out)) == finished(out) == {"img00", "img01", "img02"}
        assert not temporaries(out)


def test_a_second_ctrl_c_while_saving_is_ignored(weights, tmp_path, monkeypatch):
    """Deterministically: the first SIGINT arrives mid-run, the second while the summary is being
    written; the run still saves its records and exits 130 with one line."""
    paths = _images(tmp_path / "in", 4)
    out = tmp_path / "out"
    from jaxattr.cli import explain as explain_command

    real_batch, real_write = explain_command.BatchProgram.__call__, run_module.OutputDir.write_summary
    calls = []

    def batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the second batch
        return real_batch(*args, **kwargs)

    def write_summary(self):
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # and again while saving
        real_write(self)

    monkeypatch.setattr(explain_command.BatchProgram, "__call__", batch)
    monkeypatch.setattr(run_module.OutputDir, "write_summary", write_summary)
    try:
        result = explain(paths, out, weights, "--batch-size", "2")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert result.status == 130 and "Traceback" not in result.err, result
    assert result.lines[-1].startswith("jaxattr: interrupted")
    assert set(summary(out)) == finished(out) and len(finished(out)) >= 2


def test_special_files_among_the_references(one_image, weights, tmp_path):
    """A FIFO in a --references directory is one warning line and the run goes on; a FIFO named
    as the reference is one error line that does not claim it was skipped."""
    references = tmp_path / "references"
    references.mkdir()
    shutil.copy(one_image, references / "reference.png")
    os.mkfifo(references / "fifo.png")
    result = explain([one_image], tmp_path / "out", weights, "--steps", "2", "--references", str(references), method="ig2")
    assert result.status == 0, result
    assert [line for line in result.lines if "fifo.png" in line] == [
        f"jaxattr: warning: --references: skipped {references / 'fifo.png'}: is a FIFO (named pipe), not a regular file; skipped"
    ]
    result = explain([one_image], tmp_path / "out2", weights, "--references", str(references / "fifo.png"), method="ig2")
    assert_one_line_error(result, 1, "--references", "is a FIFO (named pipe), not a regular file")
    assert "skipped" not in result.err
