"""The backend of tests/tcp_engine.py, registered through the `runnerd.backends` entry-point group by
the test that uses it (a dist-info directory put on the daemon's path): nothing in runnerd/ names it."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from backends.base import (
    Backend,
    BackendConfiguration,
    BackendState,
    BackendStatus,
    Capability,
    EngineContext,
    MemoryEstimate,
    Mode,
    ModelFormat,
    ModelRef,
    ProgressCallback,
    RunnerOutput,
)
from backends.endpoint import Endpoint, EndpointKind
from backends.flags import FlagTable, RefusalKind, number, refused, text
from backends.process import run_process

ENGINE = Path(__file__).resolve().parent.parent / "tcp_engine.py"

TCP_FLAGS = FlagTable(
    backend="tcptest", value_style="separate",
    flags=(number("--temperature", minimum=0, maximum=2), text("--greeting-style", pattern=r"[a-z]+")),
    refusals=(refused(RefusalKind.FILES, "--greeting-file"), refused(RefusalKind.DAEMON_OWNED, "--port", "--host")),
)


class TcpTestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    greeting: str = Field(default="hello", max_length=100)


class TcpTestBackend(Backend):
    name = "tcptest"
    capabilities = frozenset({Capability.CHAT, Capability.STREAMING})
    model_formats = frozenset({ModelFormat.GGUF})
    endpoint_kind = EndpointKind.TCP
    flag_table = TCP_FLAGS
    settings_model = TcpTestSettings

    def __init__(self, greeting: str = "hello", stop_grace: float = 5.0) -> None:
        self.greeting = greeting
        self.stop_grace = stop_grace

    @classmethod
    def create(cls, context: EngineContext, settings: BaseModel) -> TcpTestBackend:
        assert isinstance(settings, TcpTestSettings)
        return cls(greeting=settings.greeting, stop_grace=context.stop_grace)

    async def install(self, progress: ProgressCallback | None = None) -> None:
        return None

    async def uninstall(self) -> None:
        return None

    def status(self) -> BackendStatus:
        return BackendStatus(state=BackendState.INSTALLED, version="tcptest 1")

    def disk_usage(self) -> int:
        return 0

    async def run(self, endpoint: Endpoint, model: ModelRef, mode: Mode, config: BackendConfiguration,
                  output: RunnerOutput) -> None:
        argv = [sys.executable, str(ENGINE), "--host", endpoint.host, "--port", str(endpoint.port),
                "--greeting", self.greeting, *self.validate_flags(config.runtime_flags)]
        await run_process(argv, env={"PATH": "/usr/bin:/bin"}, endpoint=endpoint, output=output,
                          grace=self.stop_grace)

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        return MemoryEstimate(ram_bytes=32 << 20)
