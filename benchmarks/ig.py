"""Integrated Gradients: jaxattr vs captum `IntegratedGradients` vs PAIR saliency `IntegratedGradients`,
same machine, same random torchvision weights, same images and targets.

    PYTHONPATH=. python benchmarks/ig.py          # ResNet-18/50, VGG-16, GoogLeNet; 224 px, batch 4, 32 steps
    PYTHONPATH=. python benchmarks/ig.py --models resnet18 --chunk 8
    PYTHONPATH=. python benchmarks/ig.py --models resnet18,resnet50 --size 112 --chunks all,8,16,32,auto --repeats 5

Reports seconds per image for each implementation (the best of --repeats rounds, each round
running every implementation once; jaxattr's compile time is reported separately), the ratios, the agreement of the
attributions, and the GFLOP/s jaxattr achieves (FLOPs from XLA's cost analysis) against this
machine's float32 matrix-product peak, measured first (the best of NumPy's and JAX's large sgemm).
Chunking: jaxattr evaluates --chunk steps per gradient batch (default "auto", the library's default:
about 32 images per call on CPU), captum the same points per batch (internal_batch_size = chunk x
batch) or, with --captum-chunk all, every point at once (its default, internal_batch_size=None),
PAIR batch_size = chunk (it explains one image at a time).
`--chunks all,8,16,...` times jaxattr alone at each chunk size instead (interleaved rounds, the median
kept; wall and process CPU seconds), with the peak memory XLA plans for each compiled program (arguments + outputs + temporaries,
`memory_analysis()`) and its temporaries alone (what the chunk can shrink: the arguments hold the
model's parameters whatever the chunk), as ratios to the first chunk in the list.
The load average is printed with each row: timings on a machine shared with other busy
processes are not comparable.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import saliency.core as saliency
import torch
from captum.attr import IntegratedGradients

from converters.crosscheck import max_rel_diff
from converters.references.pair import pair_call_model
from converters.torch_models import to_numpy_nhwc, to_torch_images, torch_twin
from jaxattr.methods import resolve_chunks
from jaxattr.methods.integrated_gradients import IntegratedGradientsConfig, integrated_gradients

from _harness import load, print_header, timed_compile, timed_rounds


def sgemm_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n float32 matrix product, the best of `repeats`, by NumPy (its BLAS)
    and by JAX (XLA:CPU): this machine's practical peak for dense float32 arithmetic."""
    rng = np.random.RandomState(0)
    a, b = rng.rand(n, n).astype(np.float32), rng.rand(n, n).astype(np.float32)
    a_j, b_j = jax.device_put(a), jax.device_put(b)
    matmul = jax.jit(lambda x, y: jax.lax.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    matmul(a_j, b_j).block_until_ready()
    runs = {"numpy": lambda: a @ b, "jax": lambda: matmul(a_j, b_j).block_until_ready()}
    best = timed_rounds(runs, repeats).seconds
    return {name: 2 * n**3 / seconds / 1e9 for name, seconds in best.items()}


def _flops(model, images, targets, config) -> float:
    # XLA's cost analysis counts a loop body once, whatever the trip count: count the unchunked
    # program (the same arithmetic, no loop) instead of the chunked one.
    unchunked = IntegratedGradientsConfig(steps=config.steps, rule=config.rule, chunk=None)
    fn = jax.jit(lambda m, x, t: integrated_gradients(m, x, t, config=unchunked))
    analysis = fn.lower(model, images, targets).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def bench_model(name: str, args) -> dict:
    torch_model, model = torch_twin(name)
    dtype = np.dtype(args.dtype)
    torch_model, model = torch_model.to(getattr(torch, args.dtype)), model.astype(dtype)
    images = np.random.RandomState(0).rand(args.batch, args.size, args.size, 3).astype(dtype)
    with torch.no_grad():
        targets = torch_model(to_torch_images(images)).argmax(-1).numpy()
    config = resolve_chunks(
        IntegratedGradientsConfig(steps=args.steps, rule=args.rule, chunk=args.chunk), args.batch, images.shape[1:]
    )
    ig = jax.jit(lambda m, x, t: integrated_gradients(m, x, t, config=config))
    compiled, compile_seconds = timed_compile(ig, model, images, targets)

    def captum_run():
        attributions = IntegratedGradients(torch_model).attribute(
            to_torch_images(images),
            target=torch.from_numpy(targets),
            n_steps=args.steps,
            method=args.rule,
            internal_batch_size=None if config.chunk is None or args.captum_chunk == "all" else config.chunk * args.batch,
        )
        return to_numpy_nhwc(attributions)

    def pair_run():  # one image at a time, as PAIR's API takes them; its own inclusive-mean rule
        for image, target in zip(images, targets):
            saliency.IntegratedGradients().GetMask(
                image, pair_call_model(torch_model, int(target), "logit"),
                x_steps=args.steps, batch_size=config.chunk or args.steps,
            )

    runs = {"jaxattr": lambda: np.asarray(compiled(model, images, targets)), "captum": captum_run}
    if not args.no_pair:
        runs["pair"] = pair_run
    results, seconds, _ = timed_rounds(runs, args.repeats)
    row = {name: s / args.batch for name, s in seconds.items()}
    row.update(
        model=name,
        compile=compile_seconds,
        gflops=_flops(model, images, targets, config) / seconds["jaxattr"] / 1e9,
        max_rel_diff=max_rel_diff(results["jaxattr"], results["captum"]),
    )
    return row




def chunk_sweep(name: str, args) -> list[dict]:
    """jaxattr's IG at each of `args.chunks`: median seconds per image, XLA's planned peak bytes, and
    the largest relative difference from the first chunk's attributions (summation order only)."""
    _, model = torch_twin(name)
    dtype = np.dtype(args.dtype)
    model = model.astype(dtype)
    images = np.random.RandomState(0).rand(args.batch, args.size, args.size, 3).astype(dtype)
    targets = np.arange(args.batch) % 1000
    compiled, rows = {}, []
    for chunk in args.chunks:
        config = IntegratedGradientsConfig(steps=args.steps, rule=args.rule, chunk=chunk)
        ig = jax.jit(lambda m, x, t, config=config: integrated_gradients(m, x, t, config=config))
        steps_per_call = resolve_chunks(config, args.batch, images.shape[1:]).chunk or args.steps
        label = "all" if chunk is None else str(chunk)
        compiled[label], compile_seconds = timed_compile(ig, model, images, targets)
        memory = compiled[label].memory_analysis()
        peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        rows.append({
            "model": name, "chunk": label, "per_call": args.batch * min(steps_per_call, args.steps),
            "compile": compile_seconds, "peak": peak, "temp": memory.temp_size_in_bytes,
        })
    runs = {label: (lambda c=c: np.asarray(c(model, images, targets))) for label, c in compiled.items()}
    results, seconds, cpu_seconds = timed_rounds(runs, args.repeats, warmup=1, keep="median")
    first = rows[0]["chunk"]
    for row in rows:
        row.update(
            seconds=seconds[row["chunk"]] / args.batch,
            cpu_seconds=cpu_seconds[row["chunk"]] / args.batch,
            max_rel_diff=max_rel_diff(results[row["chunk"]], results[first]),
        )
    return rows


def main_chunks(args) -> None:
    print(
        f"IG, jaxattr only, {args.dtype}, {args.rule} {args.steps} steps, batch {args.batch}, {args.size} px, "
        f"median of {args.repeats} interleaved rounds; JAX {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"{os.cpu_count()} CPUs, load average {load()}"
    )
    header = (
        "| model | chunk | images per call | s/img | time / first | CPU s/img | CPU / first | peak MB | peak / first "
        "| temporaries MB | temporaries / first | compile s | max_rel_diff vs first | load |"
    )
    print_header(header)
    for name in args.models.split(","):
        rows = chunk_sweep(name.strip(), args)
        for row in rows:
            print(
                f"| {row['model']} | {row['chunk']} | {row['per_call']} | {row['seconds']:.3f} | "
                f"{row['seconds'] / rows[0]['seconds']:.2f} | {row['cpu_seconds']:.3f} | "
                f"{row['cpu_seconds'] / rows[0]['cpu_seconds']:.2f} | {row['peak'] / 1e6:.0f} | {row['peak'] / rows[0]['peak']:.2f} | "
                f"{row['temp'] / 1e6:.0f} | {row['temp'] / rows[0]['temp']:.2f} | "
                f"{row['compile']:.1f} | {row['max_rel_diff']:.1e} | {load()} |",
                flush=True,
            )


def _chunk(text: str) -> int | str | None:
    text = text.strip()
    return None if text == "all" else text if text == "auto" else int(text)


def _chunks(text: str) -> list[int | str | None]:
    return [_chunk(c) for c in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="resnet18,resnet50,vgg16,googlenet", help="comma-separated registered model names"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rule", default="gausslegendre", help="a captum rule name")
    parser.add_argument("--chunk", type=_chunk, default="auto", help="steps per gradient batch: N, auto (default) or all")
    parser.add_argument(
        "--captum-chunk", choices=("same", "all"), default="same",
        help="captum's points per batch: jaxattr's chunk (default) or all at once (captum's default)",
    )
    parser.add_argument(
        "--chunks", type=_chunks, default=None, help="chunk sizes to compare, e.g. all,8,16,32,auto (jaxattr only)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per implementation (best is kept)")
    parser.add_argument("--no-pair", action="store_true", help="skip PAIR saliency (one image at a time)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="of weights and images")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # what the parity tests use
    jax.config.update("jax_enable_x64", args.dtype == "float64")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.chunks:
        return main_chunks(args)

    print(
        f"IG, {args.dtype}, {args.rule} {args.steps} steps, batch {args.batch}, {args.size} px, chunk {args.chunk} (captum: {args.captum_chunk}); "
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {os.cpu_count()} CPUs, load average {load()}"
    )
    peaks = sgemm_peak()
    peak = max(peaks.values())
    print(
        "float32 sgemm peak (2048^3, best of 5): "
        + ", ".join(f"{name} {gflops:.1f} GFLOP/s" for name, gflops in peaks.items()),
        flush=True,
    )
    header = (
        "| model | jaxattr s/img | captum s/img | captum/jaxattr | PAIR s/img | PAIR/jaxattr | jaxattr GFLOP/s "
        "| of sgemm peak | compile s | max_rel_diff vs captum | load |"
    )
    print_header(header)
    for name in args.models.split(","):
        r = bench_model(name.strip(), args)
        pair = f"{r['pair']:.3f} | {r['pair'] / r['jaxattr']:.2f}" if "pair" in r else "- | -"
        print(
            f"| {r['model']} | {r['jaxattr']:.3f} | {r['captum']:.3f} | {r['captum'] / r['jaxattr']:.2f} | {pair} | "
            f"{r['gflops']:.1f} | {r['gflops'] / peak:.0%} | {r['compile']:.1f} | {r['max_rel_diff']:.1e} | {load()} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
