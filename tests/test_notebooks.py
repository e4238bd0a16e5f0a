"""The notebooks run top to bottom on 8 emulated CPU devices (a fresh kernel each)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "colab.ipynb"])
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline one
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    client = nbclient.NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)  # the kernel: this environment's python (ipykernel's own spec)
    if os.environ.get("AUTOSHARD_NOTEBOOK_OUT"):
        nbformat.write(nb, pathlib.Path(os.environ["AUTOSHARD_NOTEBOOK_OUT"]) / name)
    text = "".join(
        out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "8 devices" in text or "8 x cpu" in text.lower(), text[:2000]
    assert "optimizer-state leaves folded" in text  # a summary was printed
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "plan.plot() should show a picture"
