"""The daemon's stored responses: bounded by count and bytes, least recently used dropped first, and a
conversation whose earlier turn was dropped says so."""

from __future__ import annotations

import pytest

from runnerd.api.errors import ApiError
from runnerd.api.responses.store import ResponseStore, StoredResponse


def entry(response_id: str, previous: str | None = None, text: str = "x") -> StoredResponse:
    return StoredResponse.of({"id": response_id, "output": [{"type": "message", "text": text}]},
                             [{"id": f"in_{response_id}", "type": "message"}], previous)


def test_the_least_recently_used_goes_first():
    store = ResponseStore(max_entries=2, max_bytes=1 << 20)
    store.put(entry("a"))
    store.put(entry("b"))
    store.get("a")  # read: now the most recent
    store.put(entry("c"))
    assert len(store) == 2 and store.get("a") and store.get("c")
    with pytest.raises(ApiError) as gone:
        store.get("b")
    assert gone.value.status == 404 and "'b'" in gone.value.message


def test_bytes_bound_the_store_and_an_oversized_response_is_not_kept():
    small = entry("a")
    store = ResponseStore(max_entries=100, max_bytes=small.size * 2)
    store.put(small)
    store.put(entry("b"))
    store.put(entry("c"))
    assert len(store) == 2
    store.put(entry("huge", text="y" * small.size * 3))
    assert len(store) == 2
    with pytest.raises(ApiError):
        store.get("huge")


def test_a_chain_is_rebuilt_oldest_first_and_a_dropped_turn_is_named():
    store = ResponseStore(max_entries=3, max_bytes=1 << 20)
    store.put(entry("a"))
    store.put(entry("b", previous="a"))
    store.put(entry("c", previous="b"))
    assert [e.response["id"] for e in store.chain("c")] == ["a", "b", "c"]
    store.delete("c")
    store.put(entry("c", previous="b"))
    store.put(entry("d"))  # the least recently used goes: "b", which "c" continues
    assert len(store) == 3
    with pytest.raises(ApiError) as err:
        store.chain("c")
    assert err.value.status == 404 and "'b'" in err.value.message and err.value.param == "previous_response_id"


def test_replacing_and_deleting_keep_the_byte_count_right():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20)
    store.put(entry("a"))
    store.put(entry("a", text="longer text"))
    assert len(store) == 1 and store.delete("a") and not store.delete("a")
    assert store._bytes == 0


def test_a_cycle_of_previous_ids_ends():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20)
    store.put(entry("a", previous="b"))
    store.put(entry("b", previous="a"))
    assert [e.response["id"] for e in store.chain("a")] == ["b", "a"]
