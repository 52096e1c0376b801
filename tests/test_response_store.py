"""The daemon's stored responses: bounded by count and bytes, least recently used dropped first, a
conversation whose earlier turn was dropped says so, and each caller finds only its own."""

from __future__ import annotations

import pytest

from runnerd.api.errors import ApiError
from runnerd.api.responses.store import SOCKET, ResponseStore, StoredResponse, Viewer


def entry(response_id: str, previous: str | None = None, text: str = "x", owner: str | None = None) -> StoredResponse:
    return StoredResponse.of({"id": response_id, "output": [{"type": "message", "text": text}]},
                             [{"id": f"in_{response_id}", "type": "message"}], previous, owner)


def test_the_least_recently_used_goes_first():
    store = ResponseStore(max_entries=2, max_bytes=1 << 20)
    store.put(entry("a"))
    store.put(entry("b"))
    store.get("a", SOCKET)  # read: now the most recent
    store.put(entry("c"))
    assert len(store) == 2 and store.get("a", SOCKET) and store.get("c", SOCKET)
    with pytest.raises(ApiError) as gone:
        store.get("b", SOCKET)
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
        store.get("huge", SOCKET)


def test_a_chain_is_rebuilt_oldest_first_and_a_dropped_turn_is_named():
    store = ResponseStore(max_entries=3, max_bytes=1 << 20)
    store.put(entry("a"))
    store.put(entry("b", previous="a"))
    store.put(entry("c", previous="b"))
    assert [e.response["id"] for e in store.chain("c", SOCKET)] == ["a", "b", "c"]
    store.delete("c", SOCKET)
    store.put(entry("c", previous="b"))
    store.put(entry("d"))  # the least recently used goes: "b", which "c" continues
    assert len(store) == 3
    with pytest.raises(ApiError) as err:
        store.chain("c", SOCKET)
    assert err.value.status == 404 and "'b'" in err.value.message and err.value.param == "previous_response_id"


def test_replacing_and_deleting_keep_the_byte_count_right():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20)
    store.put(entry("a"))
    store.put(entry("a", text="longer text"))
    assert len(store) == 1 and store.delete("a", SOCKET) and not store.delete("a", SOCKET)
    assert store._bytes == 0


def test_a_cycle_of_previous_ids_ends():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20)
    store.put(entry("a", previous="b"))
    store.put(entry("b", previous="a"))
    assert [e.response["id"] for e in store.chain("a", SOCKET)] == ["b", "a"]


ALICE, BOB, ADMIN = Viewer("alice"), Viewer("bob"), Viewer("root", sees_all=True)


def test_a_caller_finds_only_its_own_and_anothers_id_is_as_missing():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20)
    store.put(entry("a", owner="alice"))
    store.put(entry("s"))  # made over the unix socket
    assert store.get("a", ALICE).owner == "alice" and store.get("s", SOCKET).owner is None
    for who, response_id in [(BOB, "a"), (SOCKET, "a"), (ALICE, "s"), (Viewer(None, sees_all=False), "a")]:
        with pytest.raises(ApiError) as foreign:
            store.get(response_id, who)
        with pytest.raises(ApiError) as missing:
            store.get("z", who)
        assert (foreign.value.status, foreign.value.code) == (missing.value.status, missing.value.code) == \
               (404, "response_not_found")
        assert foreign.value.message.replace(f"'{response_id}'", "'z'") == missing.value.message
        assert not store.delete(response_id, who)
    assert len(store) == 2  # nothing another caller tried to delete is gone
    # An admin token reads and deletes anyone's.
    assert store.get("a", ADMIN).owner == "alice" and store.get("s", ADMIN).owner is None
    assert store.delete("a", ADMIN) and len(store) == 1


def test_a_foreign_lookup_does_not_make_an_entry_recent():
    store = ResponseStore(max_entries=2, max_bytes=1 << 20)
    store.put(entry("a", owner="alice"))
    store.put(entry("b", owner="alice"))
    with pytest.raises(ApiError):
        store.get("a", BOB)
    store.put(entry("c", owner="alice"))  # "a" is still the least recently used
    assert [e.response["id"] for e in (store.get("b", ALICE), store.get("c", ALICE))] == ["b", "c"]
    with pytest.raises(ApiError):
        store.get("a", ALICE)


def test_a_chain_through_anothers_turn_is_cut_there():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20)
    store.put(entry("a", owner="alice"))
    store.put(entry("b", previous="a", owner="root"))  # an admin continued alice's conversation
    assert [e.response["id"] for e in store.chain("b", ADMIN)] == ["a", "b"]
    with pytest.raises(ApiError) as missing:
        store.chain("b", ALICE)
    assert "'b'" in missing.value.message and missing.value.param is None
    store.put(entry("c", previous="b", owner="alice"))  # (a token demoted after it continued it)
    with pytest.raises(ApiError) as cut:
        store.chain("c", ALICE)
    assert "continues 'b', which is no longer stored" in cut.value.message
    assert cut.value.param == "previous_response_id"
