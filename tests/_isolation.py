"""Run loader calls on hostile files in a child process, so that nothing a file does can hurt pytest.

A crash (SIGSEGV), a hang (a FIFO opened for reading) or a runaway allocation in the child is
recorded as that case's outcome; the child is then restarted for the remaining cases. The child
runs under an address-space limit, so even a loader that trusts a declared size fails with
MemoryError instead of exhausting the machine.

Each case is {"call": "<function of this module>", "args": [...]}; the result is
{"ok": True, "value": <summary>} or {"ok": False, "type", "mro", "message"}, plus the warnings
raised, or {"crashed": returncode} / {"hung": seconds}.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_TAG = "@@case@@ "
_MEMORY_LIMIT = 4 << 30

_CHILD = r"""
import json, resource, sys, warnings
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
sys.path.insert(1, {tests!r})
import _isolation
cases = json.load(open(sys.argv[1]))
print({tag!r} + json.dumps({{"ready": True}}), flush=True)
for i in range(int(sys.argv[2]), len(cases)):
    print({tag!r} + json.dumps({{"started": i}}), flush=True)
    case = cases[i]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = {{"ok": True, "value": getattr(_isolation, case["call"])(*case["args"])}}
        except BaseException as e:
            result = {{"ok": False, "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                      "message": str(e)}}
    result["warnings"] = [str(w.message) for w in caught]
    print({tag!r} + json.dumps({{"finished": i, "result": result}}, default=str), flush=True)
"""


def run_cases(cases: list[dict], workdir: Path, *, timeout: float = 20.0, startup: float = 120.0) -> list[dict]:
    """The outcome of each case, run in order in child processes (restarted after a crash or hang)."""
    spec = workdir / "cases.json"
    spec.write_text(json.dumps(cases))
    code = _CHILD.format(limit=_MEMORY_LIMIT, tests=str(Path(__file__).parent), tag=_TAG)
    env = {**os.environ, "JAXATTR_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHONDONTWRITEBYTECODE": "1"}
    results: list[dict | None] = [None] * len(cases)
    start = 0
    while start < len(cases):
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(spec), str(start)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
        current, wait = None, startup
        while True:
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                child.kill()
                child.wait()
                if current is None:
                    raise RuntimeError("the isolated child did not start")
                results[current] = {"hung": wait}
                start = current + 1
                break
            if line is None:  # the child exited
                child.wait()
                if current is None:
                    if start < len(cases) and results[start] is None:
                        raise RuntimeError(f"the isolated child exited with {child.returncode} before any case")
                    start = len(cases)
                else:
                    results[current] = {"crashed": child.returncode}
                    start = current + 1
                break
            message = json.loads(line)
            if "started" in message:
                current, wait = message["started"], timeout
            elif "finished" in message:
                results[message["finished"]] = message["result"]
                current = None
                if message["finished"] == len(cases) - 1:
                    start = len(cases)
    return results  # type: ignore[return-value]


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        if line.startswith(_TAG):
            lines.put(line[len(_TAG) :])
    lines.put(None)


# --------------------------------------------------------------- calls the child can make


def _summary(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _summary(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_summary(v) for v in value]
    if isinstance(value, np.ndarray):
        return {"shape": list(value.shape), "dtype": str(value.dtype), "values": value.astype(float).ravel()[:64].tolist()}
    return repr(value)[:200]


def tiny_template():
    """The parameters of a torch.nn.Linear(3, 2) as a Flax Dense named fc."""
    import jax
    import numpy as np

    return {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32), "bias": jax.ShapeDtypeStruct((2,), np.float32)}}


def load_weights(path: str) -> Any:
    from jaxattr.models.weights import load_params_file

    return _summary(load_params_file(path, tiny_template(), model="tiny"))


def load_checkpoint(path: str) -> Any:
    from jaxattr.models._torch_checkpoint import load_torch_checkpoint

    return _summary(load_torch_checkpoint(path))


def load_image(path: str, kwargs: dict) -> Any:
    from jaxattr.image import load_image

    image = load_image(path, **kwargs)
    return {"shape": list(image.shape), "dtype": str(image.dtype), "finite": bool(image.size and __import__("numpy").isfinite(image).all())}


def preprocess_image(path: str, model: str, size: int) -> Any:
    from jaxattr.image import load_image
    from jaxattr.models import model_info

    image = load_image(path, model_info(model), size)
    return {"shape": list(image.shape), "dtype": str(image.dtype), "finite": bool(__import__("numpy").isfinite(image).all())}


def expand(paths: list[str], recursive: bool) -> Any:
    from jaxattr.image import expand_paths

    skipped: list[str] = []
    found = expand_paths(paths, recursive=recursive, on_skip=lambda e: skipped.append(str(e)))
    return {"found": [str(p) for p in found], "skipped": skipped}  # JSON escapes surrogates


def load_image_truncated_allowed(path: str) -> Any:
    """load_image with Pillow told to accept truncated files, as some programs set it globally."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        return load_image(path, {})
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
