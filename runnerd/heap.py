"""The daemon process's garbage-collector policy.

A full (oldest-generation) collection walks every tracked object. After start-up that is mostly what
imports and configuration left behind (modules, classes, pydantic schemas: hundreds of thousands of
objects that live as long as the process), and walking them took 60-80 ms on the event loop, in the
middle of whichever burst of requests allocated enough to trigger it. Freezing what exists once the
daemon is configured, before it listens, moves those objects out of the collector's sight: a full
collection then walks only what was allocated since (about 2 ms under bench/relay.py's 256 streams).

Only for a process that is the daemon: tests run several daemons inside one pytest process, and
freezing there would keep the tests' own cyclic garbage alive.
"""

from __future__ import annotations

import gc


def settle_after_start() -> int:
    """Collect what start-up left as garbage, then exempt the survivors from later collections.
    Returns how many objects are now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
