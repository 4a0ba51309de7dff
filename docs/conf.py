"""Sphinx configuration: the markdown guides through myst-parser, the API from numpydoc docstrings.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (``pip install ".[docs]"``).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import fastattn  # noqa: E402

project = "fastattn"
author = "fastattn developers"
copyright = "fastattn developers"
version = release = fastattn.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# only .md/.rst files are pages (plot_bench.py and conf.py are not); _static holds the images pages show
exclude_patterns = ["_build", "_static"]

# myst: anchors for the guides' "page.md#section" links; no extensions, so a $ in prose stays a dollar sign
myst_heading_anchors = 3
myst_enable_extensions = []

# autodoc / numpydoc: one entry per object, parameters rendered from the docstrings
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"
autosummary_generate = False  # the API page lists objects itself; nothing is written into docs/
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
try:
    import dask.array  # noqa: F401
except ImportError:  # the docs extra alone: document fastattn.dask without dask installed
    autodoc_mock_imports = ["dask", "distributed"]

html_theme = "alabaster"
html_title = f"fastattn {release}"
