"""Faithfulness of every method on real photographs: the embedded EfficientNet-Lite0 on the sample
images (examples/images) and the free-licence photographs of examples/faithfulness, scored with RISE
deletion/insertion AUC and the I-GOS deletion/insertion, mean and 95% bootstrap interval per method.

    python benchmarks/faithfulness.py                          # every registered method -> outputs/faithfulness
    python benchmarks/faithfulness.py --methods gnl_ig,gradcam --out /tmp/faith
    python benchmarks/faithfulness.py --step batched              # RISE's batched step: 8x fewer forwards

Each method runs `jaxattr evaluate IMAGES --method METHOD --metrics rise,igos` with its reference
defaults into OUT/<method> (explained maps, metrics.json, curves, report.html), so an interrupted run
resumes where it stopped and a second run only prints the table. The table (Markdown, as in the
README) goes to stdout and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jaxattr
from jaxattr.cli import main as jaxattr_main

from _harness import load

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGES = [ROOT / "examples" / "images", ROOT / "examples" / "faithfulness"]
METRICS = {  # metrics.json key -> column title
    "rise_deletion": "RISE deletion AUC ↓",
    "rise_insertion": "RISE insertion AUC ↑",
    "igos_deletion": "I-GOS deletion ↓",
    "igos_insertion": "I-GOS insertion ↑",
}


def _cell(summary: dict) -> str:
    return f"{summary['mean']:.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"


def _table(rows: dict[str, dict | str]) -> str:
    lines = ["| method | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for method, summary in rows.items():
        if isinstance(summary, str):
            cells = [summary] + [""] * (len(METRICS) - 1)
        else:
            cells = [_cell(summary[key]) for key in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(jaxattr.list_methods()), help="comma-separated (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "outputs" / "faithfulness")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--step", default="single", help="RISE pixels per curve point: single (224) or batched (1792)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                        help="a method's option instead of its reference default (repeatable; said in the table)")
    args = parser.parse_args()

    rows: dict[str, dict | str] = {}
    n_images = None
    for method in args.methods.split(","):
        out = args.out / method
        start = time.perf_counter()
        # Methods taking references (IG2) draw them from the same photographs: each explicand uses
        # those the model predicts as another class, as the IG2 paper's notebooks do.
        references = ["--references", *map(str, IMAGES)] if jaxattr.method_spec(method).takes_references else []
        mine = [option for option in args.option if option.startswith(method + ".")]
        options = [f"--option={option}" for option in mine]
        label = method + (f" ({', '.join(o.partition('.')[2] for o in mine)})" if mine else "")
        status = jaxattr_main(
            ["evaluate", *map(str, IMAGES), "--method", method, "--metrics", ",".join(("rise", "igos")),
             "--step", args.step, "--batch-size", str(args.batch_size), "--out", str(out), *references, *options]
        )
        print(f"{method}: exit {status} in {time.perf_counter() - start:.0f} s (load average {load()})", file=sys.stderr)
        if status != 0:
            rows[label] = f"failed (exit {status}, see {out})"
            continue
        record = json.loads((out / "metrics.json").read_text())
        rows[label] = record["methods"][method]["summary"]
        n_images = len(record["images"])
    table = _table(rows)
    step = {"single": "224 px", "batched": "1792 px"}.get(args.step, f"{args.step} px")
    caption = (f"EfficientNet-Lite0 (embedded weights), {n_images} photographs, each method with its reference "
               f"defaults unless the row says otherwise; mean [95% percentile-bootstrap interval, 1000 resamples]. RISE: step {step}, deletion "
               "to the mean colour, insertion from RISE's blur. I-GOS: 28x28 grid for methods other than I-GOS.")
    (args.out / "table.md").write_text(caption + "\n\n" + table + "\n")
    print(caption + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
