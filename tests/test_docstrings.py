"""The Examples sections of the public modules' docstrings run as written (doctest)."""
import doctest
import importlib

import pytest

MODULES = ["fastattn.attention", "fastattn.paged", "fastattn.kv_cache", "fastattn.projection",
           "fastattn.layers", "fastattn.gqa", "fastattn.dask", "fastattn.reference"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
    if name != "fastattn.reference":
        assert result.attempted > 0, f"{name} has no docstring examples"
