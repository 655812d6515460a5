"""Run a test script in a fresh process that sees four CPU devices: XLA reads its forced host
device count once, when JAX starts, so sharding tests cannot change it in the pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def report_on_four_devices(script: str, *args: str, timeout: int = 900) -> str:
    """Run `script` (python -c) with four CPU devices from the repository root; the text it printed
    after its 'REPORT' marker. Fails the test with the child's stderr if it fails."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    # The scripts import test modules, which import their sibling helpers (this one among them).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.split("REPORT", 1)[1]
