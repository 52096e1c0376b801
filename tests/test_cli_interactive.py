"""`runnerd run` in a terminal (a pseudo-terminal): Ollama's commands, Ctrl-C, and models without a chat
template, against a real daemon and llama-server. What reached the engine is read from llama-server's
own /slots (on the runner's socket, from GET /engines/ps)."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.test_cli import cli
from tests.tinymodels import write_tiny_llama

pytestmark = pytest.mark.engine

PROMPT = b"\n>>> "


class Terminal:
    """`runnerd ARGS` with a pseudo-terminal as its controlling terminal: Ctrl-C typed to it is SIGINT."""

    def __init__(self, *args: str, socket: Path) -> None:
        argv = [sys.executable, "-m", "runnerd.cli", *args, "--socket", str(socket)]
        env = {k: v for k, v in os.environ.items() if k != "RUNNERD_SOCKET"}
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once (nothing else runs in a forked copy of pytest)
            os.execve(sys.executable, argv, env)
        self.pid, self.fd = pid, fd
        self.output = bytearray()
        self.returncode: int | None = None
        self._changed = threading.Condition()
        # Read all the time: a terminal whose output is not read blocks the program writing to it.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child is gone
                chunk = b""
            with self._changed:
                self.output += chunk
                self._changed.notify_all()
            if not chunk:
                return

    def mark(self) -> int:
        with self._changed:
            return len(self.output)

    def expect(self, marker: bytes, since: int = 0, timeout: float = 60) -> int:
        """Wait until `marker` is printed after offset `since`; returns the offset after it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := self.output.find(marker, since)) < 0:
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and self.output.find(marker, since) < 0):
                    raise AssertionError(f"{marker!r} not printed within {timeout}s; output after {since}:\n"
                                         f"{bytes(self.output[since:])[-2000:]!r}")
                self._changed.wait(min(left, 0.5))
            return found + len(marker)

    def type(self, text: str) -> int:
        """Type `text`; returns the output offset from before it (what it makes printed comes after)."""
        since = self.mark()
        os.write(self.fd, text.encode())
        return since

    def say(self, text: str, until: bytes = PROMPT, timeout: float = 60) -> bytes:
        """Type `text` and wait for `until` (by default the prompt that follows the answer); returns
        what was printed in between."""
        since = self.type(text)
        end = self.expect(until, since, timeout)
        with self._changed:
            return bytes(self.output[since:end])

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            time.sleep(0.05)
        raise AssertionError(f"runnerd did not exit within {timeout}s:\n{bytes(self.output)[-2000:]!r}")

    def close(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@contextlib.contextmanager
def terminal(*args: str, socket: Path) -> Any:
    t = Terminal(*args, socket=socket)
    try:
        yield t
    finally:
        t.close()


def runner_socket(daemon: Any, model: str) -> str:
    daemon.wait_for(lambda: any(r["model"] == model and r["state"] in ("idle", "ready", "busy")
                                for r in daemon.ps()), 60, f"a runner of {model}")
    return next(r["socket"] for r in daemon.ps() if r["model"] == model)


def slots(sock: str) -> list[dict[str, Any]]:
    """llama-server's GET /slots: each slot's state and its last task (prompt tokens, sampling params)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://engine", timeout=30) as c:
        answer: list[dict[str, Any]] = c.get("/slots").json()
        return answer


def last_task(sock: str) -> dict[str, Any]:
    return max((s for s in slots(sock) if "id_task" in s), key=lambda s: s["id_task"])


def prompt_tokens(daemon: Any, sock: str, model: str, messages: list[dict[str, str]]) -> int:
    """The slot's token count after asking `messages` for one token: the reference for what the CLI
    sent. (A slot counts the tokens it holds: the prompt and all answer tokens but the last one.)"""
    daemon.openai().chat.completions.create(model=model, messages=messages, max_tokens=1)
    return int(last_task(sock)["n_prompt_tokens"])


def test_bye_a_block_of_lines_clear_and_set(daemon):
    # One token an answer: what the slot holds afterwards is the prompt (see prompt_tokens).
    with terminal("run", "tiny", "--max-tokens", "1", socket=daemon.socket) as t:
        t.expect(b">>> ")
        t.say('"""\n', until=b"... ")
        t.say("first line\n", until=b"... ")
        t.say('second line"""\n')
        sock = runner_socket(daemon, "tiny:latest")
        # One message with both lines reached the model (two messages would make a longer prompt).
        block = last_task(sock)["n_prompt_tokens"]
        assert block == prompt_tokens(daemon, sock, "tiny", [{"role": "user", "content": "first line\nsecond line"}])
        assert block != prompt_tokens(daemon, sock, "tiny", [{"role": "user", "content": "first line"},
                                                            {"role": "user", "content": "second line"}])

        t.say("hello\n")
        with_history = last_task(sock)["n_prompt_tokens"]
        assert b"Cleared session context" in t.say("/clear\n")
        t.say("hello\n")
        after_clear = last_task(sock)["n_prompt_tokens"]
        assert after_clear == prompt_tokens(daemon, sock, "tiny", [{"role": "user", "content": "hello"}]) < with_history

        assert b"Set parameter 'temperature' to '0.2'" in t.say("/set parameter temperature 0.2\n")
        t.say("hello\n")
        assert last_task(sock)["params"]["temperature"] == pytest.approx(0.2)
        shown = t.say("/?\n")
        assert b"/set parameter NAME VALUE" in shown and b"/clear" in shown and b"/bye" in shown
        t.type("/bye\n")
        assert t.wait() == 0


def test_ctrl_c_stops_the_answer_and_the_engine(daemon, tiny_model):
    # A name of its own: /set parameter num_ctx stores a context size for the model it is set on.
    assert daemon.post("/models", {"name": "long", "path": str(tiny_model)}).status_code < 300
    with terminal("run", "long", "--max-tokens", "4000", socket=daemon.socket) as t:
        t.expect(b">>> ")
        # Greedy sampling on the tiny model never picks an end of turn: 4000 tokens take seconds.
        assert b"Set parameter 'temperature'" in t.say("/set parameter temperature 0\n")
        assert b"Set parameter 'num_ctx' to '4096'" in t.say("/set parameter num_ctx 4096\n")
        sock = runner_socket(daemon, "long:latest")
        t.type("hi\n")
        deadline = time.monotonic() + 30
        while not any(s["is_processing"] for s in slots(sock)):
            assert time.monotonic() < deadline, "the engine never started the answer"
            time.sleep(0.02)

        t.say("\x03", timeout=15)  # the prompt comes back
        deadline = time.monotonic() + 10
        while any(s["is_processing"] for s in slots(sock)):
            assert time.monotonic() < deadline, f"the engine still generates: {slots(sock)}"
            time.sleep(0.05)
        task = last_task(sock)
        # The slot holds the prompt and the tokens answered (see prompt_tokens): far fewer than 4000.
        assert task["n_ctx"] >= 4096 and task["n_prompt_tokens"] < 4000, task
        assert [r["active_requests"] for r in daemon.ps() if r["model"] == "long:latest"] == [0]

        # The conversation goes on after Ctrl-C, and Ctrl-C at the prompt ends it.
        t.say("/set parameter num_predict 3\n")
        t.say("hello\n")
        assert last_task(sock)["params"]["n_predict"] == 3
        t.type("\x03")
        assert t.wait() == 0


def test_a_model_without_a_chat_template_is_answered_as_plain_completion(daemon, models_dir):
    base = write_tiny_llama(models_dir / "base.gguf", chat_template=None)
    assert daemon.post("/models", {"name": "base", "path": str(base)}).status_code < 300
    assert daemon.http.get("/models/base").json()["chat_template"] is None
    assert daemon.http.get("/models/tiny").json()["chat_template"] == "model"

    out = cli("run", "base", socket=daemon.socket, stdin="hello\nthe world\n/bye\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("base has no chat template: answering as plain completion") == 1, out.stderr
    # The prompt reached the engine's completion route (no chat template applied), with the default cap.
    params = last_task(runner_socket(daemon, "base:latest"))["params"]
    assert params["chat_format"] == "Content-only" and params["generation_prompt"] == ""
    assert params["n_predict"] == 256

    out = cli("run", "base", "hello", "--max-tokens", "3", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("has no chat template") == 1 and "at most 3 tokens" in out.stderr
    assert last_task(runner_socket(daemon, "base:latest"))["params"]["n_predict"] == 3
    out = cli("run", "tiny", "hello", "--max-tokens", "3", socket=daemon.socket)
    assert out.returncode == 0 and "chat template" not in out.stderr


def test_a_model_that_borrows_the_engines_template_is_a_base_model_too(daemon, gemma_model):
    # Gemma 3 270M's GGUF has no template: llama.cpp's backend lends it Gemma's turn format, which a base
    # model answers without ever ending its turn.
    assert daemon.post("/models", {"name": "gemma", "path": str(gemma_model)}).status_code < 300
    assert daemon.http.get("/models/gemma").json()["chat_template"] == "engine"
    out = cli("run", "gemma", "The sky is", "--max-tokens", "2", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("gemma has no chat template: answering as plain completion") == 1
    params = last_task(runner_socket(daemon, "gemma:latest"))["params"]
    assert params["chat_format"] == "Content-only" and params["n_predict"] == 2
