"""The OpenAI protocol as pydantic models: requests as clients send them, responses in OpenAI's shapes.

Requests are strict (a string where a number belongs is an error, not coerced; NaN and infinities,
which Python's JSON parser accepts, are refused) and ignore fields they do not know, as OpenAI's API
does. Ranges are declared on the fields, so a validation error names the parameter. Known OpenAI
fields that would change the response in ways this server cannot honour yet (audio, echo, the
deprecated functions, ...) are refused rather than silently ignored. vLLM's extension fields (top_k,
min_p, repetition_penalty, ignore_eos, stop_token_ids, priority, structured_outputs and the older
guided_*) are accepted under vLLM's names.
Count limits that are the operator's to set (stop strings, messages, n, ...) are checked in serving.
"""

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

FinishReason = Literal["stop", "length", "tool_calls"]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _unicode(text: str) -> str:
    # JSON's "\ud800" decodes to a lone surrogate: not Unicode text, so the tokenizer cannot take it and
    # a response echoing it could not be encoded.
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise PydanticCustomError("invalid_text", "the text holds a lone UTF-16 surrogate at character {index}",
                                  {"index": e.start}) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _shown(text: str) -> str:
    """A client's string as an error message quotes it: a lone surrogate escaped, since pydantic formats
    messages as UTF-8 and would fail (a 500) on one."""
    return text.encode("utf-8", "backslashreplace").decode()


def _unsupported(what: str, allowed: Callable[[Any], bool]) -> AfterValidator:
    """Refuses a field's value unless `allowed(value)`: the server cannot give what it asks for."""

    def check(value: Any) -> Any:
        if not allowed(value):
            raise PydanticCustomError("unsupported", f"{what} is not supported yet")
        return value

    return AfterValidator(check)


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


# ---- requests ---------------------------------------------------------------------------------


class StreamOptions(Request):
    include_usage: bool = False


class TextPart(Request):
    type: Literal["text"]
    text: Text


FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names


def _function_name(name: str) -> str:
    if not FUNCTION_NAME.fullmatch(name):
        raise PydanticCustomError("function_name", "a function name is 1 to 64 letters, digits, underscores or "
                                  "dashes; '{name}' is not", {"name": _shown(name)})
    return name


def _json_text(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as e:
        raise PydanticCustomError("json_text", "the arguments must be JSON text ({error})", {"error": str(e)}) from None
    return text


FunctionName = Annotated[str, AfterValidator(_function_name)]


class FunctionDefinition(Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments; None: any JSON object
    strict: bool | None = None  # false: the arguments are any JSON object, `parameters` only describes them

    @field_validator("parameters", mode="before")
    @classmethod
    def _schema_object(cls, parameters: Any) -> Any:
        if parameters is not None and not isinstance(parameters, dict):
            raise PydanticCustomError("json_schema", "parameters is a JSON Schema: a JSON object such as "
                                      "{'type': 'object', 'properties': {...}}")
        return parameters


class ChatTool(Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(Request):
    name: FunctionName


class NamedToolChoice(Request):
    """Forces one call of this function."""

    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class MessageFunctionCall(Request):
    name: Text
    arguments: Annotated[Text, AfterValidator(_json_text)]  # JSON text, as the response gave it


class MessageToolCall(Request):
    """A call an earlier assistant turn made, sent back as conversation history."""

    id: Text
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant: the calls it made
    tool_call_id: Text | None = Field(None, validate_default=True)  # tool: the call this message answers

    @field_validator("tool_calls")
    @classmethod
    def _calls_are_the_assistants(cls, tool_calls: list[MessageToolCall] | None, info: ValidationInfo) -> Any:
        if tool_calls and info.data.get("role") not in (None, "assistant"):
            raise PydanticCustomError("assistant_only", "only assistant messages carry tool_calls")
        return tool_calls

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers_a_call(cls, tool_call_id: str | None, info: ValidationInfo) -> Any:
        if tool_call_id is None and info.data.get("role") == "tool":
            raise PydanticCustomError("tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        return tool_call_id

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        # Said plainly here: the union's own error for an image part is a list of tag mismatches.
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in content):
            raise PydanticCustomError("text_only", "this model takes text only: image, audio and file content "
                                      "parts are not supported, only {'type': 'text', 'text': ...}")
        return content


class JSONSchemaFormat(Request):
    name: Text = Field("response", max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # outputs always follow the schema exactly, strict or not


class ResponseFormat(Request):
    """OpenAI's response_format: free text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(Request):
    """vLLM's structured_outputs: one constraint on the output."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")  # a JSON Schema (or its JSON text)
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1)
    grammar: Text | None = None  # EBNF (GBNF)
    json_object: bool | None = None
    structural_tag: Text | None = None  # xgrammar's structural tag, as JSON text


class SamplingRequest(Request):
    """The fields chat and completions requests share."""

    model: Text | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context limit
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0: greedy
    n: int = Field(1, ge=1)  # at most the server's --max-n
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # choice j is seeded with seed + j
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Text, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM extensions
    top_k: int = Field(0, ge=-1)  # 0 or -1: all tokens
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0  # lower runs first under the priority scheduling policy
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' fields
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1)
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = None  # accepted and ignored: xgrammar serves every request

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" when there are tools
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI's default
    functions: Annotated[list[Any] | None, _unsupported("function calling", lambda v: not v)] = None
    function_call: Annotated[str | dict[str, Any] | None,
                             _unsupported("function calling", lambda v: v in (None, "none"))] = None
    modalities: Annotated[list[Text] | None,
                          _unsupported("audio output", lambda v: not v or "audio" not in v)] = None
    audio: Annotated[dict[str, Any] | None, _unsupported("audio output", lambda v: v is None)] = None

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[ChatTool] | None) -> Any:
        names = [t.function.name for t in tools or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PydanticCustomError("duplicate_function", "function names must be unique; declared more than once: "
                                      "{names}", {"names": ", ".join(map(repr, twice))})
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _known_choice(cls, choice: Any) -> Any:
        # Said plainly here: the union's own error for "always" is a literal mismatch and a model mismatch.
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise PydanticCustomError("tool_choice", "tool_choice is 'none', 'auto', 'required' or "
                                      "{'type': 'function', 'function': {'name': ...}}, not '{choice}'",
                                      {"choice": _shown(choice)})
        return choice

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data:  # the tools were invalid: that error is the one to report
            return choice
        names = [t.function.name for t in info.data["tools"] or ()]
        if choice == "required" and not names:
            raise PydanticCustomError("tool_choice", "tool_choice 'required' needs tools to call")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise PydanticCustomError("tool_choice", "tool_choice names the function '{name}', which is not among "
                                      "the tools", {"name": choice.function.name})
        return choice

    @property
    def parallel_calls(self) -> bool:
        return self.parallel_tool_calls is not False


class CompletionRequest(SamplingRequest):
    # One prompt (text or token ids) or a batch of them.
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # top alternatives per token
    echo: Annotated[bool, _unsupported("echo (the prompt in the completion)", lambda v: not v)] = False
    suffix: Annotated[Text | None, _unsupported("suffix (insertion)", lambda v: not v)] = None
    best_of: Annotated[int | None, Field(ge=1), _unsupported("best_of above 1", lambda v: v in (None, 1))] = None


class TokenizeRequest(Request):
    """Either a prompt, or messages rendered with the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class LoadLoraAdapterRequest(Request):
    """vLLM's runtime adapter loading."""

    lora_name: Text = Field(min_length=1, max_length=256)
    lora_path: Text = Field(min_length=1)


class UnloadLoraAdapterRequest(Request):
    lora_name: Text


class DetokenizeRequest(Request):
    model: Text | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token's text starts in the choice's text


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str  # "call_" and 24 hex digits
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: the answer is only tool calls
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler):
        # A plain answer keeps its shape ({"role", "content"}); tool_calls appear only when there are some.
        message = handler(self)
        if message["tool_calls"] is None:
            del message["tool_calls"]
        return message


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        # OpenAI's deltas carry only what changed: {"content": "..."}, and {} on the last chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(Delta):
    name: str | None = None  # on a call's first delta
    arguments: str | None = None  # "" on the first delta, then the arguments' text piece by piece


class DeltaToolCall(Delta):
    index: int  # the call's position among the choice's calls
    id: str | None = None  # on a call's first delta
    type: Literal["function"] | None = None  # on a call's first delta
    function: DeltaFunctionCall


class DeltaMessage(Delta):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None  # None only in stream chunks before the last


class Completion(BaseModel):
    """Both the whole response and each stream chunk: OpenAI uses one object type for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamaserve"
    max_model_len: int
    root: str | None = None  # a LoRA adapter's folder
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    num_running: int
    num_waiting: int
    kv_cache_usage: float


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
