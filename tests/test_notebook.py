"""examples/tpu_quickstart.ipynb runs top to bottom (here on the CPU, with its parameters cell
made small), so it cannot rot: the install cell is skipped (jaxattr is importable), the batch
is split over two CPU devices, the overlays and the faithfulness table are produced. About a
minute on 2 loaded CPU cores, nearly all of it compilation."""

import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebook extra: pip install 'jaxattr[notebook]'")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "tpu_quickstart.ipynb"
# One method: a pixel-gradient method's first compile of EfficientNet-Lite0's backward pass alone
# would take most of the minute this test may use on 2 CPU cores; Grad-CAM's runs to its layer only.
SMALL = 'NUM_IMAGES = 2\nMETHODS = ("gradcam",)\nSTEPS = 2\nDELETION_STEP = 224 * 224 // 4\nREPOSITORY = ""'


def test_the_tpu_notebook_executes(monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    parameters[0].source = SMALL
    # The kernel imports this checkout's jaxattr, not another installed copy.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # Two CPU devices in the kernel, so the batch really is split (as over a TPU's cores).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend cpu: 2 device(s)" in text and "images/s" in text
    table = text[text.index("deletion AUC") :].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["gradcam"]
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    assert not [o for o in outputs if o.output_type == "error"]
