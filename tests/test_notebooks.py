"""The notebooks in examples/ run top to bottom (at the tiny size) and are stored
without outputs."""

import json
import os
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
EXAMPLES = REPO / "examples"


def test_the_notebooks_are_stored_without_outputs():
    names = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
    assert names == ["adapt.ipynb", "losses.ipynb", "train_and_plot.ipynb"]
    for name in names:
        for cell in nbformat.read(EXAMPLES / name, as_version=4).cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{name} is stored with outputs; clear them before committing")


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """Executes examples/NAME in a fresh kernel; returns (its outputs' text, whether it
    displayed an image).

    The kernel is this interpreter, run in tmp_path: a "python3" kernel spec in
    tmp_path, found first through JUPYTER_PATH, names sys.executable, so no kernel is
    registered anywhere and no other one is picked up. It inherits this environment:
    this checkout first on the path, the tests' compilation cache and XLA flags, the
    tiny sizes, and a run directory in tmp_path shared by the notebooks of one test.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.setenv("METARL_EXAMPLE_SIZE", "tiny")
    monkeypatch.setenv("METARL_EXAMPLE_RUN", str(tmp_path / "run"))

    def execute(name):
        notebook = nbformat.read(EXAMPLES / name, as_version=4)
        # Raises CellExecutionError, naming the cell and its traceback, on any error.
        nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        outputs = [o for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.outputs]
        text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                       for o in outputs)
        return text, any("image/png" in o.get("data", {}) for o in outputs)

    return execute


def test_losses_notebook_compares_the_three_meta_gradients(run_notebook):
    text, _ = run_notebook("losses.ipynb")
    table = text[text.index("norm"):].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["ProMP", "MAML", "DiCE"]
    for row, line in enumerate(table[1:4]):
        values = [float(v) for v in line.split()[1:]]
        assert values[row] == pytest.approx(1.0, abs=1e-4)  # each with itself
        assert values[3] > 0  # a non-zero gradient


def test_train_then_adapt_notebooks_share_the_run(run_notebook, tmp_path):
    text, plotted = run_notebook("train_and_plot.ipynb")
    assert plotted  # the live curve
    assert "2 iterations" in text
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2

    text, plotted = run_notebook("adapt.ipynb")
    assert plotted
    assert "no run in" not in text  # it evaluated the run above, without training
    assert "adapt step" in text and "checkpoint of iteration 2" in text
