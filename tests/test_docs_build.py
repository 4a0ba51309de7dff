"""The documentation site builds with warnings as errors (runs when the docs extra is installed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("numpydoc")
pytest.importorskip("myst_parser")

ROOT = Path(__file__).resolve().parents[1]


def test_sphinx_builds_without_warnings(tmp_path):
    env = dict(os.environ, PYTHONIOENCODING="utf-8",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")],
                          cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, f"sphinx-build -W failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    for page in ("index", "install", "cuda", "threads", "attention", "dask", "api", "benchmarks"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), f"expected {page}.html"
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in ("fastattn.attention", "fastattn.PagedKVCache", "fastattn.MultiheadAttention",
                 "fastattn.reference.attention", "fastattn.dask.attention", "fastattn.dask.paged_decode"):
        assert f'id="{name}"' in api, f"api.html: expected an entry for {name}"
