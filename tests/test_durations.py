from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runnerd.durations import parse_keep_alive


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("1h30m", 5400.0), ("10s", 10.0), ("500ms", 0.5), ("1.5h", 5400.0), ("300", 300.0),
    (300, 300.0), (0, 0.0), ("0", 0.0), ("0s", 0.0), (2.5, 2.5),
    ("-1", None), (-1, None), ("-5m", None), (-0.5, None),
])
def test_keep_alive_values(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "5 m", "m5", "5x", "1h-3m", "nan", True, None, "5m" * 40])
def test_keep_alive_rejects(value):
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


@given(st.text(max_size=80))
def test_keep_alive_never_crashes(text):
    try:
        result = parse_keep_alive(text)
    except ValueError:
        return
    assert result is None or result >= 0
