"""The examples in README.md and docs/*.md run as written, and the documented commands exist.

Blocks fenced as ```python run on the CPU, in order, in one namespace per file.
Blocks fenced as ```python cuda run in the CUDA half of the suite (a GPU, or the
CUDA simulator under ``NUMBA_ENABLE_CUDASIM=1``).
"""
import re
from pathlib import Path

import pytest

from conftest import CUDA, cuda_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```\s*$", re.S | re.M)

README_COMMANDS = ("pip install . && python -m fastattn bench", "bash scripts/test.sh",
                   "python -m fastattn info", "asv run --quick", "asv continuous main HEAD",
                   "asv publish")


def blocks(path, kind):
    """[(line, code)] of the python blocks of one kind ("" or "cuda") in a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1).strip() == kind]


def run_blocks(path, kind):
    namespace = {"__name__": f"docs_{path.stem}"}
    for line, code in blocks(path, kind):
        # pad so that tracebacks point at the markdown file's own lines
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


def with_blocks(kind):
    return [pytest.param(p, id=p.name) for p in DOCS if blocks(p, kind)]


def test_docs_have_examples():
    assert len(with_blocks("")) >= 2, "README.md and docs/attention.md should hold runnable examples"


@pytest.mark.parametrize("path", with_blocks(""))
def test_examples_run(path):
    run_blocks(path, "")


@CUDA
@pytest.mark.parametrize("path", with_blocks("cuda"))
def test_cuda_examples_run(path):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    run_blocks(path, "cuda")


def test_readme_gives_the_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in README_COMMANDS:
        assert command in readme, f"README.md: expected the command {command!r}"
    for doc in ("docs/attention.md", "docs/design.md", "docs/benchmarks.md"):
        assert f"]({doc})" in readme and (ROOT / doc).is_file(), f"README.md: expected a link to {doc}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "set -euo pipefail" in ci
    assert re.search(r"^bash scripts/test\.sh$", ci, re.M), ".ci/run: expected `bash scripts/test.sh`"
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    assert 'python -m pytest -m "not cuda" -W error' in script
    assert "NUMBA_ENABLE_CUDASIM=1" in script and "python -m pytest -m cuda -W error" in script
