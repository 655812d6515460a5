"""How much of `jaxattr explain`'s wall time is device compute: the CLI over copies of the sample
images (decode, compute, write; pipelined and sequential) against the pure compute of the same
compiled program (the CLI's `BatchProgram`) on an already-loaded batch. The CLI runs use a fresh
compile cache that an untimed run fills first, so they load the program rather than compile it.
One run, ratios printed, with the load average before and after (the machine may be shared).

    python benchmarks/pipeline.py                         # the issue's setting: 64 copies, IG 32 steps
    python benchmarks/pipeline.py --copies 2 --steps 8    # quick
    python benchmarks/pipeline.py --memory 64,256         # peak host memory of explain over 64 and 256 images

`--memory N1,N2` runs `jaxattr explain` (saliency: the fewest device passes, so the pipeline's own
buffers are what grows, if anything) in a fresh process per count over N images (copies of the
samples) and prints each process's peak resident memory: with bounded queues it must not grow
with the number of images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxattr import cli
from jaxattr.cli._common import fit_memory
from jaxattr.cli.explain import BatchProgram
from jaxattr.image import expand_paths, load_batch
from jaxattr.methods import method_spec
from jaxattr.models import create_model, model_info
from jaxattr.run import Batch

from _harness import load

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"


def copies(folder: Path, n: int) -> list[Path]:
    """`n` copies of every sample image, distinct files (links to one file count once)."""
    sources = expand_paths([ROOT / "examples" / "images"])
    made = []
    for i in range(n):
        for source in sources:
            made.append(Path(shutil.copyfile(source, folder / f"copy{i:03d}_{source.name}")))
    return made


def device_seconds_per_image(batch_size: int, steps: int, repeats: int) -> float:
    """Compute alone: the CLI's own batch program on a loaded batch of `batch_size`, compiled
    first, results on host."""
    info = model_info(MODEL)
    sources = expand_paths([ROOT / "examples" / "images"])
    items = (sources * batch_size)[:batch_size]
    batch = Batch(items, load_batch(items, info), np.ones(batch_size, bool))
    model = create_model(MODEL)
    method = fit_memory(method_spec("integrated_gradients").build(steps=steps), model, batch_size, (info.image_size, info.image_size, 3))
    program = BatchProgram(model, method, batch_size, info.image_size, None, None, None, frozenset(), None, None)
    run = lambda: program(batch, None)
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / (repeats * batch_size)


def cli_seconds_per_image(paths: list[Path], out: Path, batch_size: int, steps: int, loaders: int) -> float:
    argv = ["explain", *map(str, paths), "--model", MODEL, "--method", "integrated_gradients", "--steps", str(steps)]
    argv += ["--out", str(out), "--batch-size", str(batch_size), "--loaders", str(loaders)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(argv)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"jaxattr explain failed ({status})")
    return elapsed / len(paths)


def peak_rss_of_explain(paths: list[Path], out: Path, batch_size: int, loaders: int) -> int:
    """Peak resident bytes of a fresh `jaxattr explain` process over `paths` (saliency)."""
    argv = [sys.executable, "-c", "import sys; from jaxattr.cli import main; sys.exit(main())", "explain",
            *map(str, paths), "--model", MODEL, "--method", "saliency", "--out", str(out),
            "--batch-size", str(batch_size), "--loaders", str(loaders), "--no-compile-cache"]  # each compiles alike
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"jaxattr explain failed ({status}): {' '.join(argv[3:8])} ...")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def memory_check(counts: list[int], batch_size: int, loaders: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="jaxattr-memory-"))
    try:
        (work / "in").mkdir()
        paths = copies(work / "in", -(-max(counts) // 4))
        peaks = {n: peak_rss_of_explain(paths[:n], work / f"out{n}", batch_size, loaders) for n in counts}
    finally:
        shutil.rmtree(work)
    for n, peak in peaks.items():
        print(f"explain over {n:5d} images (saliency, batch {batch_size}, {loaders} loaders): peak RSS {peak / 2**20:7.1f} MiB"
              f"   / first = {peak / peaks[counts[0]]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loaders", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions of the pure compute")
    parser.add_argument("--memory", metavar="N1,N2", help="instead: peak host memory of explain over N1 and N2 images")
    args = parser.parse_args()
    if args.memory:
        memory_check([int(n) for n in args.memory.split(",")], args.batch_size, args.loaders)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {MODEL}, integrated_gradients {args.steps} steps, "
          f"batch {args.batch_size}; load average before {load()}")
    device = device_seconds_per_image(args.batch_size, args.steps, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="jaxattr-pipeline-"))
    try:
        (work / "in").mkdir()
        paths = copies(work / "in", args.copies)
        # One untimed run of one batch exports and compiles the CLI's program into a fresh
        # $JAXATTR_HOME; each timed run then loads it from there (its share of the wall time is
        # the program load a user's second run pays, under a second here).
        os.environ["JAXATTR_HOME"] = str(work / "home")
        cli_seconds_per_image(paths[: args.batch_size], work / "warm-up", args.batch_size, args.steps, args.loaders)
        pipelined = cli_seconds_per_image(paths, work / "pipelined", args.batch_size, args.steps, args.loaders)
        sequential = cli_seconds_per_image(paths, work / "sequential", args.batch_size, args.steps, 0)
    finally:
        shutil.rmtree(work)
    print(f"{len(paths)} images")
    print(f"device compute only        {device * 1e3:9.1f} ms/image")
    print(f"explain, pipelined ({args.loaders} loaders) {pipelined * 1e3:9.1f} ms/image   wall/device = {pipelined / device:.3f}")
    print(f"explain, sequential        {sequential * 1e3:9.1f} ms/image   wall/device = {sequential / device:.3f}")
    print(f"load average after {load()}")


if __name__ == "__main__":
    main()
