"""The request path's model lookup (`ModelStore.get`) never waits for the store's lock, and under
concurrent tag and remove it sees each model either whole or not at all."""

from __future__ import annotations

import threading
from pathlib import Path

from runnerd.store import ModelNotFound, ModelStore


def test_get_answers_while_a_writer_holds_the_lock(tmp_path: Path, tiny_model: Path) -> None:
    store = ModelStore(tmp_path)
    store.add("tiny", tiny_model)
    held, release = threading.Event(), threading.Event()

    def commit() -> None:  # what a pull's commit thread does: hold the lock while it writes
        with store._lock:
            held.set()
            release.wait(30)

    writer = threading.Thread(target=commit)
    writer.start()
    try:
        assert held.wait(10)
        answers: list[Path] = []
        reader = threading.Thread(target=lambda: answers.append(store.get("tiny").path))
        reader.start()
        reader.join(5)
        assert answers == [tiny_model], "get() waited for the lock a writer holds"
    finally:
        release.set()
        writer.join()


def test_reads_see_whole_models_under_concurrent_tag_and_remove(tmp_path: Path, tiny_model: Path) -> None:
    store = ModelStore(tmp_path)
    source = store.add("tiny", tiny_model)
    done = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(60):
                store.tag("tiny", "alias", force=True)
                store.remove("alias")
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=churn)
    writer.start()
    seen = {"found": 0, "missing": 0}
    while not done.is_set():
        assert store.get("tiny") == source
        try:
            alias = store.get("alias")
        except ModelNotFound:
            seen["missing"] += 1
        else:
            seen["found"] += 1
            assert (alias.name, alias.path, alias.size) == ("alias:latest", source.path, source.size)
        names = [m.name for m in store.list()]
        assert "tiny:latest" in names and len(names) in (1, 2)
    writer.join()
    assert not errors
    assert seen["found"] and seen["missing"]
    assert [m.name for m in store.list()] == ["tiny:latest"]
    # What is on disk agrees: a new store reads the same models back.
    assert [m.name for m in ModelStore(tmp_path).list()] == ["tiny:latest"]
