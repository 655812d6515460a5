"""The throughput path: several classes per image in one program (`targets` (b, K), `--top-k`),
the streaming pipeline of `jaxattr explain` (same outputs as the sequential path, resumable),
`--list`, and JAX's persistent compilation cache."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _devices import report_on_four_devices
from _images import noise_images

from jaxattr import cli, explain
from jaxattr.cli import explain as explain_command
from jaxattr.image import ImageLoadError, load_image
from jaxattr.models import create_model, model_info
from jaxattr.models.weights import save_params
from jaxattr.run import BackgroundWriter, Prefetch, call_interruptibly, computing_abandoned, read_path_list

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------- several classes per image (API)


def _tiny_forward():
    """A small conv net as a pytree forward: 8x8 RGB -> 5 logits."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "conv": jax.random.normal(k1, (3, 3, 3, 4)) * 0.5,
        "dense": jax.random.normal(k2, (4 * 8 * 8, 5)) * 0.1,
    }

    def apply(params, images):
        h = jax.lax.conv_general_dilated(images, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).reshape(images.shape[0], -1) @ params["dense"]

    return jax.tree_util.Partial(apply, params)


@pytest.fixture(scope="module")
def tiny():
    images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3))
    return _tiny_forward(), images


@pytest.mark.parametrize(
    "method, options",
    [("integrated_gradients", {"steps": 4}), ("smoothgrad", {"samples": 3})],
)
def test_k_classes_in_one_call_equal_k_single_class_runs(tiny, method, options):
    forward, images = tiny
    targets = jnp.array([[4, 0], [1, 2], [3, 3]])
    keys = jax.vmap(jax.random.key)(jnp.arange(3))  # one key per image: each class sees the same noise
    together = explain(forward, images, method, targets=targets, key=keys, **options)
    assert together.attributions.shape == (3, 2, 8, 8, 3)
    assert together.maps.shape == (3, 2, 8, 8)
    assert together.targets.shape == together.probabilities.shape == (3, 2)
    for k in range(2):
        alone = explain(forward, images, method, targets=targets[:, k], key=keys, **options)
        scale = np.abs(alone.attributions).max()
        # vmap over the class axis may reorder a reduction; nothing else differs.
        np.testing.assert_allclose(together.attributions[:, k], alone.attributions, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(together.maps[:, k], alone.maps, rtol=1e-5, atol=1e-6 * np.abs(alone.maps).max())
        np.testing.assert_array_equal(together.targets[:, k], alone.targets)
        np.testing.assert_allclose(together.probabilities[:, k], alone.probabilities, rtol=1e-6)


def test_top_k_explains_the_k_most_probable_classes(tiny):
    forward, images = tiny
    result = explain(forward, images, "saliency", top_k=3)
    probabilities = jax.nn.softmax(forward(images), axis=-1)
    order = np.argsort(-np.asarray(probabilities), axis=-1)[:, :3]
    np.testing.assert_array_equal(result.targets, order)
    assert (np.diff(np.asarray(result.probabilities), axis=-1) <= 0).all()
    listed = explain(forward, images, "saliency", targets=jnp.asarray(order))
    np.testing.assert_array_equal(result.attributions, listed.attributions)


def test_bad_class_arguments_are_clear_errors(tiny):
    forward, images = tiny
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(3, K\)"):
        explain(forward, images, "saliency", targets=jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="top_k"):
        explain(forward, images, "saliency", top_k=2, targets=1)
    with pytest.raises(ValueError, match="exceeds"):
        explain(forward, images, "saliency", top_k=6)


# ----------------------------------------------------------------------- pipeline pieces


def test_prefetch_returns_results_in_order_and_bounds_the_work_ahead():
    started = []
    gate = threading.Event()

    def load(i):
        started.append(i)
        gate.wait(5)
        if i == 3:
            raise ImageLoadError(f"{i}.png", "broken")
        return i * 10

    with Prefetch(list(range(6)), load, workers=4, ahead=2) as prefetch:
        time.sleep(0.05)
        assert sorted(started) == [0, 1]  # never more than `ahead` items beyond the consumer
        gate.set()
        results = []
        for i in range(6):
            try:
                results.append(prefetch(i))
            except ImageLoadError:
                results.append("unreadable")
        with pytest.raises(RuntimeError, match="order"):
            prefetch(0)
    assert results == [0, 10, 20, "unreadable", 40, 50]


def test_background_writer_keeps_order_and_reports_a_failure():
    done = []
    with BackgroundWriter(depth=2) as writer:
        for i in range(5):
            writer.submit(lambda i=i: done.append(i))
    assert done == [0, 1, 2, 3, 4]

    def disk_full():
        raise OSError(28, "No space left on device")

    writer = BackgroundWriter(depth=1)
    writer.submit(disk_full)
    writer.submit(lambda: done.append("after"))  # may be queued before the failure is seen
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert "after" not in done  # nothing runs after a failure


def test_call_interruptibly_returns_the_result_or_raises_the_exception_unchanged():
    assert call_interruptibly(lambda: 42) == 42
    for error in (ValueError("a mask larger than the image"), MemoryError(), KeyboardInterrupt()):
        def fail():
            raise error

        with pytest.raises(type(error)) as raised:
            call_interruptibly(fail)
        assert raised.value is error
    assert not computing_abandoned()  # every call's thread has ended


class _Stop(Exception):
    pass


def test_a_signal_handler_stops_the_wait_for_a_running_xla_call():
    """The waiting thread runs its signal handler while the call is inside XLA (held there by a host
    callback until released); the call is abandoned and runs on. Were the call made in the main
    thread, the handler would run only after XLA returned, and nothing would be abandoned."""
    release = threading.Event()

    def held(x):
        release.wait(10)  # bounded: a broken mechanism fails the test rather than hanging it
        return x

    computation = jax.jit(lambda x: jax.pure_callback(held, jax.ShapeDtypeStruct((), jnp.float32), x) + 1)

    def stop(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGUSR1, stop)
    signal_soon = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))  # sent from another thread
    try:
        signal_soon.start()
        with pytest.raises(_Stop):
            call_interruptibly(lambda: jax.block_until_ready(computation(jnp.float32(1))))
        assert computing_abandoned() and not release.is_set()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal_soon.join()
        release.set()
    deadline = time.monotonic() + 30
    while computing_abandoned() and time.monotonic() < deadline:  # the released call ends
        time.sleep(0.01)
    assert not computing_abandoned()


def test_read_path_list_reports_and_skips_missing_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{tmp_path / 'a.png'}\n\n{tmp_path / 'gone.png'}\n")
    lines = []
    assert read_path_list(listing, lines.append) == [tmp_path / "a.png"]
    assert "gone.png" in lines[0] and "1 listed path missing" in lines[-1]


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_params(path, create_model("resnet18", weights=None).params, model="resnet18")
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """Five small images (the last batch of 2 is padded) and a corrupt one."""
    folder = noise_images(tmp_path / "images", 5, (20, 28))
    (folder / "im2b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def _explain(inputs, out, weights, *extra) -> int:
    argv = ["explain", *map(str, inputs), "--model", "resnet18", "--weights", str(weights), "--out", str(out)]
    return cli.main([*argv, "--batch-size", "2", "--method", "saliency", "--no-compile-cache", *extra])


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".png", ".npy")}


def _records(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["images"]


def test_pipeline_writes_what_the_sequential_path_writes(images, tmp_path, weights, capsys):
    assert _explain([images], tmp_path / "seq", weights, "--loaders", "0") == 1  # the corrupt file
    assert _explain([images], tmp_path / "pipe", weights, "--loaders", "3") == 1
    sequential, pipelined = _files(tmp_path / "seq"), _files(tmp_path / "pipe")
    assert len(sequential) == 10 and sequential == pipelined  # bit-identical files
    assert _records(tmp_path / "seq") == _records(tmp_path / "pipe")
    assert "images/s" in capsys.readouterr().err


def test_an_interrupted_pipelined_run_resumes(images, tmp_path, weights, monkeypatch, capsys):
    (images / "im2b.jpg").unlink()
    out = tmp_path / "out"
    calls, real = [], explain_command.BatchProgram.__call__

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_command.BatchProgram, "__call__", crash_on_third_batch)
    assert _explain([images], out, weights) == 130
    assert sorted(p.stem for p in out.glob("*.png")) == ["im0", "im1", "im2", "im3"]  # two whole batches
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    monkeypatch.setattr(explain_command.BatchProgram, "__call__", real)
    assert _explain([images], out, weights) == 0
    assert "4 of 5 images already have outputs" in capsys.readouterr().err
    assert _explain([images], tmp_path / "whole", weights) == 0
    resumed, whole = _files(out), _files(tmp_path / "whole")
    assert resumed.keys() == whole.keys()
    for name in ["im0.npy", "im1.npy", "im2.npy", "im3.npy"]:  # written before the interruption
        assert resumed[name] == whole[name]
    # im4 ran alone after the resume (a batch of 1, not a padded batch of 2): only rounding differs.
    np.testing.assert_allclose(np.load(out / "im4.npy"), np.load(tmp_path / "whole" / "im4.npy"), rtol=1e-5, atol=1e-7)


def test_top_k_writes_one_map_per_class_and_resumes(images, tmp_path, weights, capsys):
    (images / "im2b.jpg").unlink()
    out = tmp_path / "out"
    assert _explain([images], out, weights, "--top-k", "2") == 0
    records = {r["output"]: r for r in _records(out)}
    info = model_info("resnet18")
    model = create_model("resnet18", weights=str(weights))
    batch = jnp.stack([load_image(images / "im0.png", info), load_image(images / "im1.png", info)])
    reference = explain(model, batch, "saliency", top_k=2)
    for row, name in enumerate(["im0", "im1"]):
        classes = [int(c) for c in records[name]["classes"].split()]
        assert classes == list(np.asarray(reference.targets[row]))
        assert records[name]["class_index"] == classes[0]
        for k, c in enumerate(classes):
            np.testing.assert_array_equal(np.load(out / f"{name}.class{c}.npy"), reference.attributions[row, k])
            assert (out / f"{name}.class{c}.png").is_file()
    assert len(list(out.glob("*.npy"))) == 10
    capsys.readouterr()
    assert _explain([images], out, weights, "--top-k", "2") == 0
    assert "5 of 5 images already have outputs" in capsys.readouterr().err
    # One class's files of one image gone: that image is explained again, every class of it.
    second = int(records["im1"]["classes"].split()[1])
    before = _files(out)
    for path in out.glob(f"im1.class{second}.*"):
        path.unlink()
    assert _explain([images], out, weights, "--top-k", "2") == 0
    assert "4 of 5 images already have outputs" in capsys.readouterr().err
    assert _files(out) == before
    assert _explain([images], out, weights, "--top-k", "3") == 1  # other settings: refused
    assert _explain([images], out, weights, "--top-k", "2", "--target", "3") == 1
    assert "exclude each other" in capsys.readouterr().err


def test_list_file_of_paths(images, tmp_path, weights, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'im0.png'}\n{images / 'missing.png'}\n{images / 'im3.png'}\n")
    assert _explain([], tmp_path / "out", weights, "--list", str(listing)) == 0
    err = capsys.readouterr().err
    assert "missing.png" in err and "skipped" in err
    assert sorted(r["output"] for r in _records(tmp_path / "out")) == ["im0", "im3"]
    assert _explain([], tmp_path / "out", weights) == 2  # a usage error
    assert "--list FILE" in capsys.readouterr().err
    assert _explain([], tmp_path / "out", weights, "--list", str(tmp_path / "nope.txt")) == 1
    assert "cannot read --list" in capsys.readouterr().err


# ------------------------------------------------------------------------ compile cache


def test_a_second_process_neither_traces_nor_compiles_the_batch_program(images, tmp_path, weights):
    """`jaxattr explain` stores its batch program in $JAXATTR_HOME/compile/programs: a second
    process reads it (no trace of the program, no XLA compilation of it) and writes the same files;
    a damaged program file and damaged stored counts are built again, with the same result."""
    (images / "im2b.jpg").unlink()
    script = textwrap.dedent(
        """
        import sys, jax
        events = []
        def listen(event, start, end, **kw):
            if event.endswith("jaxpr_trace_duration") and kw.get("fun_name") == "program":
                events.append("trace")
            # the program, compiled directly or through its export (jax.export's `call`)
            if event.endswith("backend_compile_duration") and kw.get("fun_name") in ("jit(program)", "jit(call)"):
                events.append("compile")
        jax.monitoring.register_event_time_span_listener(listen)
        from jaxattr import cli
        status = cli.main(sys.argv[1:])
        print(events.count("trace"), events.count("compile"))
        sys.exit(status)
        """
    )
    env = {**os.environ, "JAXATTR_OFFLINE": "1", "JAXATTR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}

    def explain_in_a_process(out: str, *extra: str) -> tuple[int, int]:
        argv = ["explain", str(images), "--model", "resnet18", "--weights", str(weights), "--batch-size", "2",
                "--resize", "40", "--crop", "32", "--method", "smoothgrad", "--samples", "2", "--out", str(tmp_path / out), *extra]
        run = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        traces, compiles = map(int, run.stdout.split()[-2:])
        return traces, compiles

    first, second = explain_in_a_process("first"), explain_in_a_process("second")
    assert first == (1, 1) and second == (0, 0)
    programs = list((tmp_path / "home" / "compile" / "programs").glob("*.program"))
    assert len(programs) == 1
    programs[0].write_bytes(b"truncated")
    for count in programs[0].parent.glob("*.count"):  # the stored counts, damaged: computed again
        count.write_text('{"value": "not a count"}')
    assert explain_in_a_process("third") == (1, 1)
    assert explain_in_a_process("uncached", "--no-compile-cache")[0] == 1
    files = [_files(tmp_path / out) for out in ("first", "second", "third", "uncached")]
    assert len(files[0]) == 10 and all(f == files[0] for f in files)


def test_explain_splits_its_batches_over_every_local_device(images, tmp_path, weights):
    """On four devices the CLI's exported batch program is partitioned over them (a batch of 3
    padded to 4), in the first process and when a second one loads it; the maps equal a
    one-device run up to XLA's kernels for the per-device batch."""
    (images / "im2b.jpg").unlink()
    script = textwrap.dedent(
        """
        import os, sys, jax
        from jaxattr import cli
        assert len(jax.local_devices()) == 4
        for out in ("first", "second"):
            assert cli.main([*sys.argv[1:-1], "--out", os.path.join(sys.argv[-1], out)]) == 0
        print("REPORT")
        """
    )
    argv = ["explain", str(images), "--model", "resnet18", "--weights", str(weights), "--batch-size", "3",
            "--resize", "40", "--crop", "32", "--method", "integrated_gradients", "--steps", "4"]
    report_on_four_devices(script, *argv, str(tmp_path))  # in this test's $JAXATTR_HOME (conftest)
    assert cli.main([*argv, "--out", str(tmp_path / "one"), "--no-compile-cache"]) == 0
    for name in ("im0", "im1", "im2", "im3", "im4"):
        one = np.load(tmp_path / "one" / f"{name}.npy")
        for out in ("first", "second"):
            np.testing.assert_allclose(np.load(tmp_path / out / f"{name}.npy"), one, rtol=0, atol=1e-6 * np.abs(one).max())


def test_no_compile_cache_leaves_the_cache_directory_alone(images, tmp_path, weights):
    (images / "im2b.jpg").unlink()
    assert _explain([images / "im0.png"], tmp_path / "out", weights) == 0  # _explain passes --no-compile-cache
    assert not (Path(os.environ["JAXATTR_HOME"]) / "compile").exists()


# -------------------------------------------------------------------------------- bench


def test_bench_prints_its_figures_as_json(capsys):
    argv = ["bench", "--model", "resnet18", "--random-init", "--method", "saliency", "--batch-size", "1", "--repeats", "1"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "resnet18" and report["method"] == "saliency" and report["batch_size"] == 1
    assert report["compile_s"] > 0 and report["images_per_s"] > 0
    # Arguments alone (ResNet-18's float32 parameters, ~46.8 MB) bound the peak from below.
    assert report["peak_memory_bytes"] > 11_689_512 * 4
    assert report["gflop_per_batch"] > 1.8  # at least one ResNet-18 forward (1.8 GFLOP) is in it
    # A method that draws random numbers only through its settings (a uniform baseline) gets keys.
    argv = ["bench", "--model", "resnet18", "--random-init", "--method", "integrated_gradients", "--baseline", "uniform",
            "--steps", "2", "--batch-size", "1", "--repeats", "1"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["config"]["baseline"] == "uniform"
    assert cli.main(["bench", "--method", "saliency", "--steps", "3"]) == 2  # another method's option


def test_compile_clock_counts_nested_compiles_once():
    from jaxattr.compilation import CompileClock

    clock = CompileClock()
    for span in [(0.0, 10.0), (2.0, 3.0), (9.0, 12.0), (20.0, 21.0)]:  # a nested trace, an overlap, a gap
        clock._listen("/jax/core/compile/jaxpr_trace_duration", *span)
    clock._listen("/jax/some/other_event", 30.0, 40.0)
    assert clock.seconds == 13.0
    with CompileClock() as live:
        jax.jit(lambda x: jnp.cos(x) * 3.0)(jnp.ones(7)).block_until_ready()
    assert live.seconds > 0
