"""Every notebook in notebooks/ runs clean, top to bottom, in a real Jupyter kernel (nbclient).

The kernel is this test run's own interpreter (the project's .venv), declared in a kernelspec written to
a temporary directory, so the test needs no ``jupyter kernelspec install`` on a fresh machine and never
picks up some other Python's "python3" kernel. Each notebook starts the fake LLM server itself and
asserts on its own results; here we also check that no cell raised, nothing was written to stderr
(warnings included) and the notebook left its promised outputs behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "nagents-frames-tests"
CELL_TIMEOUT_S = 120

# What each notebook must leave in its outputs besides running clean (by file-name stem).
EXPECTED_MIME: dict[str, set[str]] = {
    "01_quickstart": {"text/html"},
    "02_job_api": {"text/html", "image/png"},
    "03_sql_over_jobs": {"text/html", "image/png"},
    "04_parquet_etl": {"text/html"},
}


# Text each notebook must show somewhere in its outputs (a result the reader is meant to see).
EXPECTED_TEXT: dict[str, tuple[str, ...]] = {
    "01_quickstart": ("echo: Classify the sentiment", "Broke after two days"),
    # watch() leaves one display, updated in place to the final state of the resumed job.
    "02_job_api": ("Summary: 48 succeeded, 12 failed", "resumed: ", "200 of 200 done", ">completed</span>"),
    "03_sql_over_jobs": ("summaries (bad day)", "RateLimitError"),
    "04_parquet_etl": ("wrote 1500 rows", "second run: 0 requests", "Tagline for"),
}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernelspec for this interpreter, with the checkout first on the path."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nagents-frames (tests)",
                "language": "python",
                "env": {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
            }
        )
    )
    return root


def execute(path: Path, workdir: Path, kernel_dir: Path) -> Any:
    """Run the notebook at ``path`` with ``workdir`` as its working directory; return the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    client = NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


def test_every_notebook_is_covered() -> None:
    assert NOTEBOOKS, "no notebooks found"
    assert {p.stem for p in NOTEBOOKS} == set(EXPECTED_MIME) == set(EXPECTED_TEXT), "add new notebooks here"


def test_notebooks_are_stored_without_outputs() -> None:
    # Outputs hold ports, timestamps and base64 images: they would churn every diff.
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs before saving"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean(path: Path, tmp_path: Path, kernel_dir: Path) -> None:
    nb = execute(path, tmp_path, kernel_dir)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count is not None for c in code_cells)
    mimes: set[str] = set()
    for cell in code_cells:
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream" and out.name == "stderr":
                # tqdm's text fallback writes its bar to stderr; anything else (warnings, tracebacks) is a bug.
                text = "".join(line for line in out.text.splitlines(keepends=True) if "row/s" not in line)
                assert not text.strip(), f"{path.name} wrote to stderr:\n{out.text}"
            mimes.update(out.get("data", {}))
    missing = EXPECTED_MIME[path.stem] - mimes
    assert not missing, f"{path.name} produced no {missing} output"
    shown = json.dumps([cell.outputs for cell in code_cells])
    for text in EXPECTED_TEXT[path.stem]:
        assert json.dumps(text)[1:-1] in shown, f"{path.name} never showed {text!r}"
    if path.stem == "01_quickstart":
        check_progress_bar(nb, code_cells[1], rows=6)


def check_progress_bar(nb: Any, cell: Any, rows: int) -> None:
    """batch_complete's tqdm.auto bar rendered in the kernel (a widget, or text) and reached the end; the
    table still displayed after it, and no warning was printed."""
    widget = [o for o in cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text_bar = [o for o in cell.outputs if o.output_type == "stream" and f"{rows}/{rows}" in o.text]
    assert widget or text_bar, f"no progress bar in {cell.outputs}"
    if widget:
        # The bar's updates travel as widget messages, not outputs; nbclient keeps the widgets' final state.
        states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
        bars = [w["state"] for w in states if w["model_name"] in ("FloatProgressModel", "IntProgressModel")]
        assert bars and bars[0]["value"] == bars[0]["max"] == rows, bars
        labels = [str(w["state"].get("value", "")) for w in states if w["model_name"] == "HTMLModel"]
        assert any(f"{rows}/{rows}" in label for label in labels), labels
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert results and "text/html" in results[0]["data"]
