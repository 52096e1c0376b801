"""The contract runnerd offers an orchestrator placing models across nodes, checked with three real
daemons on loopback TCP and a placement driver written for this test (not a product feature: runnerd has
no cluster layer; see DESIGN.md, "Beyond one machine").

The driver speaks only the documented HTTP API, each node with its own bearer token: `GET /ready`,
`GET /node`, `GET /models/{m}/estimate`, a chat request with `X-Preload-Only: true` to load a model,
`GET /engines/ps`, `POST /node/drain`. `GET /node` does not say what `memory.ram_limit` a node runs with,
so the driver is given the limits the operator configured (as an orchestrator's inventory would hold
them). It keeps its own ledger: a model goes to the node with the most room left (limit minus the sum of
the estimates the node itself gave for what the driver placed there) where its estimate fits, and to no
node when none has room.

The contract: with such a driver no load is refused (no 507, no 503), nothing is evicted, and what each
node's `/engines/ps` holds (each runner's estimate or, when larger, its measured RSS: what admission
counts) stays within its limit. Draining a node while a stream runs on it: the stream completes, the node
unloads, a new load there is refused as `node_draining`, and the other nodes take its models.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.tinymodels import write_tiny_llama

pytestmark = pytest.mark.engine

# Room for the held stream's 4000 tokens: about four seconds of generation, long enough to drain the node
# while it runs. Every other request asks for at most 2 tokens.
CONTEXT = {"RUNNERD_DEFAULT_CONTEXT_SIZE": "4096"}
CHAT = [{"role": "user", "content": "hello"}]
# Node limits in units of one model's estimate: room for 2, 3 and 4 tiny models, with half a model to
# spare for what a runner measures beyond its estimate.
SLOTS = {"n1": 2.5, "n2": 3.5, "n3": 4.5}


class Refused(AssertionError):
    pass


@dataclass
class Node:
    name: str
    url: str
    token: str
    ram_limit: int  # configured by the operator; GET /node does not report it
    http: httpx.Client = field(init=False)
    placed: dict[str, int] = field(default_factory=dict)  # the driver's ledger: model -> its estimate here
    draining: bool = False

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {self.token}"})

    @property
    def room(self) -> int:
        return self.ram_limit - sum(self.placed.values())

    def get(self, path: str) -> Any:
        resp = self.http.get(path)
        assert resp.status_code == 200, f"{self.name} GET {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def ps(self) -> list[dict[str, Any]]:
        runners: list[dict[str, Any]] = self.get("/engines/ps")
        return [r for r in runners if r["state"] != "exited"]

    def preload(self, model: str) -> httpx.Response:
        return self.http.post("/engines/v1/chat/completions", json={"model": model, "messages": CHAT},
                              headers={"X-Preload-Only": "true"})


class Driver:
    """Places models on nodes by its own bookkeeping of the nodes' estimates against their limits."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.requests: list[tuple[str, str, int]] = []  # (node, model, status) of every load sent

    def survey(self) -> None:
        """Each node: ready, not draining, llama.cpp running, and its limit within its RAM."""
        for node in self.nodes:
            assert node.http.get("/ready").json() == {"ready": True}, node.name
            info = node.get("/node")
            assert info["drain"]["draining"] is False, node.name
            assert info["backends"]["llama.cpp"].startswith("Running"), info["backends"]
            assert node.ram_limit < info["memory"]["total_bytes"], node.name

    def estimate(self, node: Node, model: str) -> int:
        answer = node.get(f"/models/{model}/estimate")
        assert answer["known"] and answer["vram_bytes"] == 0, answer
        ram: int = answer["ram_bytes"]
        return ram

    def place(self, model: str) -> Node | None:
        """Load `model` on the node with the most room where it fits; None (and nothing sent) if none."""
        fits = [(node.room - cost, node, cost) for node in self.nodes if not node.draining
                for cost in [self.estimate(node, model)] if cost <= node.room]
        if not fits:
            return None
        _, node, cost = max(fits, key=lambda fit: fit[0])  # ties: the first node
        resp = node.preload(model)
        self.requests.append((node.name, model, resp.status_code))
        if resp.status_code != 200:
            raise Refused(f"{node.name} refused {model}: {resp.status_code} {resp.text}")
        node.placed[model] = cost
        return node

    def check(self) -> None:
        """Every node holds exactly what the driver placed there (nothing evicted), within its limit."""
        for node in self.nodes:
            if node.draining:
                continue
            runners = node.ps()
            assert sorted(r["model"].removesuffix(":latest") for r in runners) == sorted(node.placed), \
                (node.name, runners)
            held = sum(max(r["memory"]["ram_bytes"], r["measured_ram_bytes"]) for r in runners)
            assert held <= node.ram_limit, (node.name, held, node.ram_limit, runners)

    def drain(self, node: Node) -> dict[str, Any]:
        resp = node.http.post("/node/drain")
        assert resp.status_code == 200, resp.text
        node.draining = True
        state: dict[str, Any] = resp.json()["drain"]
        return state

    def replace(self, node: Node) -> dict[str, Node | None]:
        """Put a draining node's models on the others."""
        moved = {model: self.place(model) for model in sorted(node.placed)}
        node.placed.clear()
        return moved


class Stream(threading.Thread):
    """A long streamed completion over TCP, read as it comes."""

    def __init__(self, node: Node, model: str) -> None:
        super().__init__()
        self.node, self.model = node, model
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = {"model": self.model, "prompt": "the", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        try:
            with httpx.Client(base_url=self.node.url, timeout=120,
                              headers={"Authorization": f"Bearer {self.node.token}"}) as client, \
                    client.stream("POST", "/engines/v1/completions", json=body) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line:
                        self.events.append(line)
                        self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tcp_url(daemon: Any) -> str:
    found: list[str] = []

    def listening() -> bool:
        match = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", daemon.output())
        if match:
            found.append(match.group(1))
        return bool(match)

    wait_until(listening, 10, "the TCP listener")
    return f"http://127.0.0.1:{found[0]}"


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    # Different seeds: distinct files of one size, so one estimate.
    return {f"m{i}": write_tiny_llama(tmp_path / f"m{i}.gguf", seed=i) for i in range(6)}


def test_placement_drain_and_replacement_across_three_nodes(make_daemon, models, tmp_path):
    # The operator sizes each node's limit from one model's estimate (a daemon of its own, then gone).
    sizing = make_daemon({"m0": models["m0"]}, env=CONTEXT)
    one = sizing.http.get("/models/m0/estimate").json()["ram_bytes"]
    sizing.stop()

    nodes = []
    for name, slots in SLOTS.items():
        token = f"{name}-t0ken-{time.monotonic_ns()}"
        (tmp_path / f"{name}.token").write_text(token + "\n")
        limit = int(slots * one)
        d = make_daemon(models, env={**CONTEXT, "RUNNERD_MEMORY__RAM_LIMIT": str(limit),
                                     "RUNNERD_MEMORY__RAM_RESERVE": "0"},
                        args=["--listen", "127.0.0.1:0", "--token-file", str(tmp_path / f"{name}.token")])
        nodes.append(Node(name, tcp_url(d), token, limit))
    n1, n2, n3 = nodes
    # Each node answers only to its own token.
    assert httpx.get(f"{n1.url}/node", headers={"Authorization": f"Bearer {n2.token}"}).status_code == 401

    driver = Driver(nodes)
    driver.survey()

    # Placement: by the driver's ledger, every load is accepted and nothing is evicted.
    placed = {model: driver.place(model) for model in ("m0", "m1", "m2", "m3")}
    assert {m: n.name if n else None for m, n in placed.items()} == \
        {"m0": "n3", "m1": "n2", "m2": "n3", "m3": "n1"}, "the most room first"
    driver.check()

    # Drain n3 while a stream runs on it.
    stream = Stream(n3, "m0")
    stream.start()
    try:
        assert stream.started.wait(60) and stream.status == 200, (stream.status, stream.error, stream.events)
        seen_at_drain = len(stream.events)
        state = driver.drain(n3)
        assert state["draining"] is True and state["runners_left"] == 2 and state["active_requests"] == 1, state

        # A new load there is refused, with when to ask again; the driver goes elsewhere.
        refused = n3.preload("m1")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "node_draining", refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert n3.http.get("/ready").status_code == 503

        moved = driver.replace(n3)
        assert {m: n.name if n else None for m, n in moved.items()} == {"m0": "n2", "m2": "n1"}
        driver.check()
    finally:
        stream.join(120)
    assert not stream.is_alive() and stream.error is None, stream.error
    assert stream.events[-1] == "data: [DONE]" and '"finish_reason":"length"' in stream.events[-2].replace(" ", "")
    assert len(stream.events) > seen_at_drain + 100, "the stream went on after the drain began"

    # The drained node unloads everything.
    wait_until(lambda: n3.ps() == [], 30, "n3 to unload")
    assert n3.get("/node")["drain"] == {**state, "runners_left": 0, "active_requests": 0, "drained": True}

    # The moved models answer where they went.
    for node, model in ((n2, "m0"), (n1, "m2")):
        answer = node.http.post("/engines/v1/chat/completions",
                                json={"model": model, "messages": CHAT, "max_tokens": 2})
        assert answer.status_code == 200, answer.text

    # The ledger bounds what the driver asks: m4 fits on n2 only; m5 fits nowhere and is never sent.
    assert [driver.place("m4"), driver.place("m5")] == [n2, None]
    driver.check()
    assert all(status == 200 for *_, status in driver.requests), driver.requests
    assert [(n, m) for n, m, _ in driver.requests] == [
        ("n3", "m0"), ("n2", "m1"), ("n3", "m2"), ("n1", "m3"), ("n2", "m0"), ("n1", "m2"), ("n2", "m4")]
    for node in nodes:
        node.http.close()
