"""The teaching notebooks: each one runs top to bottom, headless, as a reader would run it (a cell that raises
fails the test, and the notebooks assert their hand-written steps against the library), and the committed copies
are executed, with their outputs, so that they read well on GitHub."""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


def test_the_six_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_from_image_to_pixels.ipynb", "02_vision_tower_and_projector.ipynb",
                                           "03_merging_and_decoding.ipynb", "04_where_does_it_look.ipynb",
                                           "05_quantization.ipynb", "06_finetuning.ipynb"]


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """A "python3" kernel spec that runs this very interpreter, found before any other: a user-wide "python3" spec
    (say, one installed by `ipykernel install --user` for another Python) must not run the notebooks."""
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return spec.parent.parent


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, python3_kernel, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(python3_kernel))  # searched before the user and system folders
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed(path):
    """Committed with every cell run in order, no error, figures inline, on the tiny checkpoint, under 1 MB."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), "run it top to bottom, then commit"
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {}) for o in outputs)
    assert any("REAL_WEIGHTS = False" in c.source for c in cells), "commit the run on the tiny checkpoint"
    assert path.stat().st_size < 1_000_000
