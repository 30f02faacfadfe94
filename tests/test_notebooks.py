"""The notebooks execute top to bottom in their tiny modes."""

import nbformat
from nbclient import NotebookClient

from parity import REPO
from tiny_svd import tiny_pipeline


def execute(name, cwd, timeout=600):
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def outputs(notebook) -> str:
    return "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


def test_quickstart_converts_loads_generates_and_saves(tmp_path, monkeypatch):
    tiny_pipeline().save_pretrained(tmp_path / "diffusers")
    monkeypatch.setenv("SVD_JAX_SOURCE", str(tmp_path / "diffusers"))
    monkeypatch.setenv("SVD_JAX_CONVERTED", str(tmp_path / "converted"))
    monkeypatch.setenv("SVD_JAX_OUTPUT", str(tmp_path / "out.gif"))
    monkeypatch.setenv("SVD_JAX_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = execute("quickstart.ipynb", tmp_path)
    assert (tmp_path / "converted" / "manifest.json").is_file()
    assert (tmp_path / "out.gif").stat().st_size > 0
    assert "wrote" in outputs(notebook)
    html = [o["data"]["text/html"] for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if "text/html" in o.get("data", {})]
    assert any("<video" in h and "data:video/mp4;base64," in h for h in html)  # svd_jax.show played it inline
    assert "Warning" not in outputs(notebook)  # e.g. tqdm's "IProgress not found" without ipywidgets


def test_parity_notebook_tiny(tmp_path, monkeypatch):
    monkeypatch.delenv("SVD_JAX_DIFFUSERS", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = execute("parity.ipynb", tmp_path)
    assert "max abs error" in outputs(notebook)
