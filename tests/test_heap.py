"""The daemon's heap after start-up is frozen: later collections no longer walk what imports and
configuration left behind. Run in a child process, since freezing would hold this one's garbage."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

_CHILD = """
import gc, json
import runnerd.server  # what a daemon imports before it serves
from runnerd.heap import settle_after_start
before = len(gc.get_objects())
frozen = settle_after_start()
young = [object() for _ in range(10)]
print(json.dumps({"before": before, "frozen": frozen, "after": len(gc.get_objects())}))
"""


def test_settling_takes_start_up_objects_out_of_collections() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    counts = json.loads(out)
    assert counts["frozen"] >= counts["before"] * 0.9
    # What a full collection still walks: the few objects made since, not the hundreds of thousands before.
    assert counts["after"] < counts["before"] / 50
