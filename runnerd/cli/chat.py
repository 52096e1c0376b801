"""`runnerd run MODEL [PROMPT]`: one streamed answer to a prompt given on the command line, else a
conversation read from stdin (a terminal or a pipe) with Ollama's habits: `/bye`, `/clear`,
`/set parameter NAME VALUE`, `/?`, and messages of several lines between `\"\"\"` lines.

A model whose GGUF carries no chat template (GET /models/{name} says "chat_template" is null, or
"engine": the engine would lend it its architecture's turn format) is a base model, which never ends a
chat turn (Gemma 3 270M loops on one): it is answered as plain text completion (/engines/v1/completions),
one prompt at a time, with a token cap, and `run` says so once on stderr.

Ctrl-C during an answer closes its stream, which makes the daemon cancel the engine's request, and
comes back to the prompt; at the prompt Ctrl-C (or Ctrl-D, or /bye) ends the conversation. stdin is
read by a daemon thread (os.read: no lock on sys.stdin that could keep the interpreter from exiting)
so that the event loop stays free to see Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

if TYPE_CHECKING:
    from runnerd.cli.client import DaemonClient

# Tokens an answer of a model without a chat template may take unless --max-tokens says otherwise.
BASE_MODEL_MAX_TOKENS = 256

# /set parameter: Ollama's sampling options that the engines' OpenAI-compatible bodies take under the
# same name; num_predict (max_tokens), stop and num_ctx (a load setting) are handled apart.
_SAMPLING: dict[str, type[int] | type[float]] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
    "presence_penalty": float, "frequency_penalty": float}
PARAMETERS = (*_SAMPLING, "num_predict", "stop", "num_ctx")

HELP = f"""Available commands:
  /set parameter NAME VALUE   set a parameter for this conversation, one of
                                {", ".join(PARAMETERS[:5])},
                                {", ".join(PARAMETERS[5:])}
                              (num_ctx is the context size: stored as the model's, its engine restarts)
  /clear                      forget the conversation
  /bye                        exit (also Ctrl-D, or Ctrl-C at the prompt)
  /?, /help                   this help

Use \"\"\" to begin a message of several lines, and \"\"\" to end it. Ctrl-C stops an answer."""

_T = TypeVar("_T")
_INTERRUPT: Final = object()  # Ctrl-C while no answer runs
_EOF: Final = object()


class Chat:
    """One model's conversation: its messages, the parameters set for it, and how it is asked."""

    def __init__(self, client: DaemonClient, model: str, max_tokens: int | None, completion: bool) -> None:
        self.client = client
        self.model = model
        self.completion = completion  # no chat template: plain completion, each prompt on its own
        self.max_tokens = max_tokens if max_tokens is not None else BASE_MODEL_MAX_TOKENS if completion else None
        self.options: dict[str, Any] = {}
        self.history: list[dict[str, str]] = []

    async def answer(self, text: str) -> str:
        """Stream the answer to `text` to stdout and return it; the conversation is not changed."""
        body: dict[str, Any] = {"model": self.model, **self.options, "stream": True}
        if self.completion:
            path, body["prompt"] = "/engines/v1/completions", text
        else:
            path, body["messages"] = "/engines/v1/chat/completions", [*self.history, {"role": "user", "content": text}]
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        parts: list[str] = []
        try:
            async for event in self.client.stream_sse(path, body):
                for choice in event.get("choices", []):
                    piece = choice.get("text") if self.completion else (choice.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                        print(piece, end="", flush=True)
        finally:
            print(flush=True)  # also after Ctrl-C: the prompt starts on a line of its own
        return "".join(parts)

    async def turn(self, text: str) -> None:
        """Answer `text`; the exchange joins the conversation only once the answer is complete."""
        reply = await self.answer(text)
        if not self.completion:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    async def set_parameter(self, name: str, raw: str) -> str:
        """Apply `/set parameter NAME VALUE`; returns what to tell the user (ValueError: a bad value)."""
        if name == "num_ctx":
            size = int(raw)
            if size <= 0:
                raise ValueError("num_ctx must be a positive number of tokens")
            # As an Ollama client does: a load request with options.num_ctx stores the size in the model's
            # configuration (keeping its other settings) and restarts its idle engine with it.
            await self.client.request("POST", "/api/generate",
                                      {"model": self.model, "options": {"num_ctx": size}, "stream": False})
            return f"Set parameter 'num_ctx' to '{size}' (stored as {self.model}'s context size)"
        if name == "num_predict":
            tokens = int(raw)
            self.max_tokens = None if tokens < 0 else tokens  # Ollama's -1: no limit
        elif name == "stop":
            self.options["stop"] = raw.split()
        elif name in _SAMPLING:
            self.options[name] = _SAMPLING[name](raw)
        else:
            raise ValueError(f"unknown parameter '{name}'; known: {', '.join(PARAMETERS)}")
        return f"Set parameter '{name}' to '{raw}'"


class _Conversation:
    """The interactive loop: messages from stdin, commands, and Ctrl-C."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat
        self.tty = sys.stdin.isatty()
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.answering: asyncio.Task[Any] | None = None
        self.eof = False

    def _on_sigint(self) -> None:
        if self.answering is not None and not self.answering.done():
            self.answering.cancel()  # closes the stream: the daemon cancels the engine's request
        else:
            self.inbox.put_nowait(_INTERRUPT)

    async def _interruptible(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """Run `work` so that Ctrl-C cancels it (None then) rather than ending the conversation."""
        task = asyncio.create_task(work)
        self.answering = task
        try:
            await asyncio.wait({task})
        finally:
            self.answering = None
        return None if task.cancelled() else task.result()

    def _start_reader(self) -> None:
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()

        def put(item: object) -> bool:
            try:
                loop.call_soon_threadsafe(self.inbox.put_nowait, item)
            except RuntimeError:  # the loop is closed: the command is over
                return False
            return True

        def pump() -> None:
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            pending = ""
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                pending += decoder.decode(chunk, final=not chunk)
                *lines, pending = pending.split("\n")
                if not chunk and pending:
                    lines.append(pending)
                for line in lines:
                    if not put(line.removesuffix("\r")):
                        return
                if not chunk:
                    put(_EOF)
                    return

        threading.Thread(target=pump, name="runnerd-stdin", daemon=True).start()

    async def _next(self, prompt: str) -> object:
        if self.eof:
            return _EOF
        if self.tty:
            print(prompt, end="", flush=True)
        item = await self.inbox.get()
        if item is _EOF:
            self.eof = True
        return item

    async def read_message(self) -> tuple[str, bool] | None:
        """The next message and whether it came as a \"\"\" block; ("", False) for nothing to do,
        None to end the conversation (end of input, or Ctrl-C at the prompt)."""
        item = await self._next(">>> ")
        if item is _EOF or item is _INTERRUPT:
            if self.tty:
                print()
            return None
        assert isinstance(item, str)
        text = item.strip()
        if not text.startswith('"""'):
            return text, False
        first = text[3:]
        if first.endswith('"""'):
            return first[:-3].strip(), True
        lines = [first] if first else []
        while True:
            item = await self._next("... ")
            if item is _INTERRUPT:  # Ctrl-C abandons the block
                print()
                return "", False
            if item is _EOF:
                break
            assert isinstance(item, str)
            if item.rstrip().endswith('"""'):
                lines.append(item.rstrip()[:-3])
                break
            lines.append(item)
        return "\n".join(lines).strip(), True

    async def command(self, text: str) -> bool:
        """Run a /command; False when it ends the conversation."""
        word = text.split()[0]
        if word in ("/bye", "/exit"):
            return False
        if word in ("/?", "/help"):
            print(HELP)
        elif word == "/clear":
            self.chat.history.clear()
            print("Cleared session context")
        elif word == "/set":
            parts = text.split(maxsplit=3)
            if len(parts) < 4 or parts[1] != "parameter":
                print(f"Usage: /set parameter NAME VALUE (NAME: {', '.join(PARAMETERS)})")
                return True
            from runnerd.errors import ClientError

            try:
                print(await self.chat.set_parameter(parts[2], parts[3]))
            except ValueError as exc:
                print(f"Couldn't set parameter: {exc}", file=sys.stderr)
            except ClientError as exc:
                print(f"runnerd: {exc}", file=sys.stderr)
        else:
            print(f"Unknown command '{word}'. Type /? for help")
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGINT)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        self._start_reader()
        try:
            while True:
                message = await self.read_message()
                if message is None:
                    return
                text, block = message
                if not text:
                    continue
                if text.startswith("/") and not block:
                    if await self._interruptible(self.command(text)) is False:
                        return
                    continue
                await self._interruptible(self.chat.turn(text))  # an error ends the conversation, as before
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


async def run(client: DaemonClient, args: argparse.Namespace) -> Any:
    shown = await client.request("GET", f"/models/{quote(args.model)}")
    # "chat_template" is absent for models whose header runnerd does not read (not GGUF): chat.
    completion = shown.get("chat_template", "model") != "model"
    chat = Chat(client, args.model, args.max_tokens, completion)
    if completion:
        print(f"{args.model} has no chat template: answering as plain completion, each prompt on its own, "
              f"at most {chat.max_tokens} tokens an answer (--max-tokens changes it)", file=sys.stderr, flush=True)
    if args.prompt:
        await chat.answer(" ".join(args.prompt))
    else:
        await _Conversation(chat).run()
    return None, None
