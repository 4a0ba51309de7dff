"""The decode kernel's prefetch cursor asks for every cache line of a tile once (white box).

Prefetches are hints, so the results cannot show a gap: here the cursor's
pure-Python form runs with a recorder in place of the prefetch instruction.
"""
import numpy as np
import pytest

from fastattn.cpu import _decode


@pytest.fixture
def recorded(monkeypatch):
    lines = []

    def span(x, start, count, step):  # the same rounding as _prefetch_span, recording line starts
        first = (start + step - 1) // step * step
        lines.extend(range(first, start + count, step))

    monkeypatch.setattr(_decode, "_prefetch_span", span)
    return lines


@pytest.mark.parametrize("n", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("row_len, count, step", [(8 * 128, 4 * 128, 32), (8 * 128, 64, 16), (2 * 48, 4 * 48, 64),
                                                  (128, 256, 32)])
def test_the_cursor_covers_every_line_of_the_tile_once(recorded, n, row_len, count, step):
    starts = (np.random.default_rng(n).permutation(4 * n) * row_len).astype(np.int64)[:n]
    ahead = (None, starts, row_len, n, step)
    cursor = (0, 0)
    for _ in range(10 * n * row_len // count + 10):  # more calls than needed: the cursor stops at the end
        cursor = _decode._prefetch_ahead.py_func(ahead, cursor, count)
    # the lines that begin inside a row of the tile: all of its lines when rows are whole lines
    expected = sorted(line for s in starts for line in range(-(-s // step) * step, s + row_len, step))
    assert sorted(recorded) == expected
