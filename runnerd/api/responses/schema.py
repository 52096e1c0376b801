"""OpenAI Responses request bodies and input items, validated at the door. Unknown request fields are kept
and relayed to an engine that serves the API itself; the translation uses only what is modelled here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputText(_Part):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(_Part):
    type: Literal["input_image"]
    image_url: str = Field(pattern=r"^(https?|data):")
    detail: str | None = None


Part = Annotated[InputText | InputImage, Field(discriminator="type")]


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, InputText))


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = ""


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["reasoning"]


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
                      Field(discriminator="type")]


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    name: str = Field(min_length=1)


class InputTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[InputItem] = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _typed_messages(cls, value: Any) -> Any:
        """An item with a role and no type is a message (the SDKs' short form)."""
        if not isinstance(value, list):
            return value
        return [{**item, "type": "message"} if isinstance(item, dict) and "type" not in item and "role" in item
                else item for item in value]


class ResponsesRequest(InputTokensRequest):
    stream: bool = False
    store: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


def input_items(value: str | list[InputItem]) -> list[InputItem]:
    """The request's input as items (a string is one user message)."""
    if isinstance(value, str):
        return [MessageItem(role="user", content=[InputText(type="input_text", text=value)])] if value else []
    return list(value)
