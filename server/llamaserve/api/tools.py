"""Tool calling (OpenAI's `tools`): the tools and past calls rendered into the prompt, the grammar a call
follows, and the calls parsed back out of the generated text, whole or as it streams.

A call is written in one of two formats:

- hermes, the default: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call
  (Hermes, Qwen 2.5 and 3). Used when the chat template knows nothing of tools: the tools are then
  listed in the system prompt (DEFAULT_TOOLS_PROMPT), past calls become these blocks in the assistant's
  turn, and tool results become user turns of `<tool_response>` blocks, so a template that knows only
  system/user/assistant (Llama 2's, SmolLM2's) renders a whole tool conversation.
- llama: a bare `{"name": "f", "parameters": {...}}` (Llama 3.1 to 3.3's JSON tool calling). Used when
  the template renders `tools` itself, unless it writes hermes blocks (`<tool_call>` in its source).

The grammar is an xgrammar structural tag built here as plain JSON (xgrammar imports torch, which the
API process never does): "required" is one call or more and nothing else, a named tool_choice exactly one
call of that function, and "auto" free text in which any call that starts must be a declared function
with arguments valid against its `parameters` (a triggered tag). Constraining "auto" costs a grammar
(compiled once per tool set, then cached) and a token mask each step, and buys calls that always parse
and validate: without it a model is free to misspell a name or break the JSON, and the server could only
return the broken call or drop it.
"""

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from jinja2 import TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaserve.api.protocol import ChatCompletionRequest, NamedToolChoice
from llamaserve.sampling_params import StructuredOutput
from llamaserve.tokenizer import normalize_messages

ANY_JSON_OBJECT = {"type": "object"}
# One whitespace character at most between JSON tokens: the structural tag's JSON allows any, and a small
# model can otherwise spend its whole max_tokens on newlines inside a call.
MAX_WHITESPACE = 1

DEFAULT_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolCallFormat:
    """How a call is written in the generated text."""

    name: str
    start: str  # the text that opens a call
    start_is_json: bool  # the start is the first characters of the call's JSON object itself
    prefix: str  # before the JSON object in the grammar's calls
    end: str  # after the JSON object ("": nothing)
    arguments_key: str  # the arguments' key in the JSON object
    separator: str  # between parallel calls, in the grammar (the parser also drops it between calls)
    trigger: str  # in free text, the grammar holds the output to a call from here on

    def call_begin(self, name: str) -> str:
        # Function names are [a-zA-Z0-9_-]: nothing to escape.
        return f'{self.prefix}{{"name": "{name}", "{self.arguments_key}": '


HERMES = ToolCallFormat("hermes", start="<tool_call>", start_is_json=False, prefix="<tool_call>\n",
                        end="\n</tool_call>", arguments_key="arguments", separator="\n", trigger="<tool_call>")
LLAMA = ToolCallFormat("llama", start='{"name"', start_is_json=True, prefix="", end="", arguments_key="parameters",
                       separator="; ", trigger='{"name": ')
ARGUMENTS_KEYS = ("arguments", "parameters")  # either is read in either format


# ---- the request's tools ----------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCalling:
    """What a request's tools ask of its generations: tools offered and a tool_choice other than "none"."""

    tools: tuple[dict[str, Any], ...]  # as the request declared them: {"type": "function", "function": {...}}
    choice: Literal["auto", "required", "named"]
    named: str | None  # the function a named tool_choice forces
    parallel: bool  # more than one call per answer
    format: ToolCallFormat

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [t["function"] for t in self.tools]

    def structured_output(self, text: StructuredOutput | None = None) -> StructuredOutput:
        """The structural tag the output follows. `text` is the response_format's constraint on an answer
        without calls: with "auto" the answer is then either calls or such text; "required" and a named
        choice allow no text, so it plays no part there."""
        fmt = self.format
        if self.choice == "named":
            function = next(f for f in self.functions if f["name"] == self.named)
            grammar = _call_tag(fmt, function)
        elif self.choice == "required" or text is not None:
            grammar = {"type": "tags_with_separator", "tags": [_call_tag(fmt, f) for f in self.functions],
                       "separator": fmt.separator, "at_least_one": True, "stop_after_first": not self.parallel}
            if self.choice == "auto":
                grammar = {"type": "or", "elements": [grammar, _text_format(text)]}
        else:
            grammar = {"type": "triggered_tags", "triggers": [fmt.trigger],
                       "tags": [_call_tag(fmt, f) for f in self.functions],
                       "at_least_one": False, "stop_after_first": not self.parallel}
        tag = {"type": "structural_tag", "format": grammar}
        return StructuredOutput("structural_tag", json.dumps(tag, ensure_ascii=False, separators=(",", ":")))

    def parser(self) -> "ToolCallParser":
        return ToolCallParser(self.format)


def tool_calling(request: ChatCompletionRequest, template: str | None) -> ToolCalling | None:
    """The request's tool calling; None when it offers no tools or its tool_choice is "none" (the output is
    then plain text, though past calls in the conversation are still rendered)."""
    if not request.tools or request.tool_choice == "none":
        return None
    named = request.tool_choice.function.name if isinstance(request.tool_choice, NamedToolChoice) else None
    choice = "named" if named else request.tool_choice or "auto"
    tools = tuple(t.model_dump(exclude_none=True) for t in request.tools)
    return ToolCalling(tools, choice, named, request.parallel_calls, call_format(template))


def _call_tag(fmt: ToolCallFormat, function: Mapping[str, Any]) -> dict[str, Any]:
    schema = function.get("parameters") if function.get("strict") is not False else None
    return {"type": "tag", "begin": fmt.call_begin(function["name"]),
            "content": {"type": "json_schema", "json_schema": schema or ANY_JSON_OBJECT,
                        "max_whitespace_cnt": MAX_WHITESPACE},
            "end": "}" + fmt.end}


def _text_format(text: StructuredOutput) -> dict[str, Any]:
    """A StructuredOutput as a structural tag's format."""
    if text.kind == "json":
        return {"type": "json_schema", "json_schema": json.loads(text.spec)}
    if text.kind == "regex":
        return {"type": "regex", "pattern": text.spec}
    if text.kind == "grammar":
        return {"type": "grammar", "grammar": text.spec}
    if text.kind == "choice":
        return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in json.loads(text.spec)]}
    return json.loads(text.spec)["format"]  # structural_tag


# ---- the prompt -------------------------------------------------------------------------------


_PARSER = ImmutableSandboxedEnvironment()


@lru_cache(maxsize=32)
def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template takes the `tools` variable (and so renders tools and past calls itself)."""
    if template is None:
        return False
    try:
        return "tools" in meta.find_undeclared_variables(_PARSER.parse(template))
    except TemplateSyntaxError:  # rendering will say so
        return False


def call_format(template: str | None) -> ToolCallFormat:
    """The format calls are written in after this template's prompt."""
    if template_renders_tools(template) and "<tool_call>" not in template:
        return LLAMA
    return HERMES


def chat_inputs(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                template: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the `tools` variable (None: not passed) to render `template` with. `tools`: the
    tools to show the model, None when there are none or tool_choice is "none"."""
    if template_renders_tools(template):
        return [_with_parsed_arguments(m) for m in messages], list(tools) if tools else None
    return default_messages(messages, tools), None


def _with_parsed_arguments(message: Mapping[str, Any]) -> dict[str, Any]:
    # Templates write a call's arguments with `tojson`, so they take them as a mapping (as transformers
    # and vLLM pass them), not as the JSON text the API carries.
    if not message.get("tool_calls"):
        return dict(message)
    calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def default_messages(messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages with only system/user/assistant roles and text: the tools listed in the system prompt, past
    calls as hermes blocks, tool results as user turns of <tool_response> blocks (consecutive ones in one
    turn)."""
    rendered: list[dict[str, Any]] = []
    previous_was_tool = False
    for message in normalize_messages(messages):
        message.pop("tool_call_id", None)
        calls = message.pop("tool_calls", None)
        if message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_was_tool:
                rendered[-1]["content"] += "\n" + response
            else:
                rendered.append({"role": "user", "content": response})
            previous_was_tool = True
            continue
        previous_was_tool = False
        if calls:
            blocks = [_hermes_block(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
            message["content"] = "\n".join(([message["content"]] if message["content"] else []) + blocks)
        rendered.append(message)
    if tools:
        section = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if rendered and rendered[0]["role"] in ("system", "developer"):
            rendered[0]["content"] = (rendered[0]["content"] + "\n\n" + section).lstrip()
        else:
            rendered.insert(0, {"role": "system", "content": section})
    return rendered


def _hermes_block(name: str, arguments: Any) -> str:
    # The JSON's separators are those the grammar's calls are generated with, so the model sees its own
    # format in the conversation.
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


# ---- parsing the output -----------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """A piece of one call as it streams: the first carries its id and name (and arguments ""), the
    following ones the next characters of its arguments' JSON text."""

    index: int  # the call's position among the choice's calls
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as generated (cut short if the generation was)


class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives, so that a stream sends content
    as soon as it cannot be part of a call, and each call's arguments as they are generated.

    Text that may be the beginning of a call's start (`<tool_call>`, `{"name"`) is held back until later
    text decides it, as stop strings are, and so is trailing whitespace, which is dropped when a call
    follows (and between calls, with the format's separator): content is the text around the calls. A
    call's JSON object is read a character at a time; once its name is read the call is announced, and
    its arguments follow as they come. A call that breaks before its name is read was text after all,
    and is released as such; one that breaks later ends there. The result does not depend on how the
    text is split into pushes.
    """

    def __init__(self, format: ToolCallFormat):
        self.format = format
        self.calls: list[ParsedToolCall] = []
        self._content: list[str] = []
        self._out: list[str | ToolCallDelta] = []  # what the current push releases
        self._held = ""  # text not yet released (outside a call)
        self._call: _CallReader | None = None  # the call being read
        self._announced = False  # the current call's first delta was sent
        self._after_call = False  # separators and whitespace before the next content are dropped
        self._spacing = ""  # the whitespace before the call being read
        self._between = " \t\r\n" + format.separator.strip()

    @property
    def content(self) -> str:
        """All content released so far."""
        return "".join(self._content)

    def finish_reason(self, reason: str) -> str:
        """How the choice ended: "tool_calls" when it stopped having made calls; "length" stays "length"
        (its last call may be cut short)."""
        return "tool_calls" if self.calls and reason == "stop" else reason

    def push(self, text: str) -> list[str | ToolCallDelta]:
        """What `text` releases, in order: content (str) and call pieces."""
        self._feed(text)
        return self._release()

    def flush(self) -> list[str | ToolCallDelta]:
        """At the end of generation: held-back text never became a call. A call cut short keeps what it
        has; one cut before its name was text."""
        while self._call is not None:
            self._sync_call()
            reader, self._call = self._call, None
            if not self._announced:
                self._feed(self._not_a_call(reader))  # which may start another call
        if self._held:
            self._emit_content(self._held.rstrip() if self.calls else self._held)
            self._held = ""
        return self._release()

    def _feed(self, text: str) -> None:
        buffer, position = self._held + text, 0
        self._held = ""
        while position < len(buffer):
            if self._call is None:
                position = self._read_text(buffer, position)
            else:
                buffer, position = self._read_call(buffer, position)

    def _release(self) -> list[str | ToolCallDelta]:
        out, self._out = self._out, []
        return out

    # -- outside calls

    def _read_text(self, buffer: str, position: int) -> int:
        start = self.format.start
        found = buffer.find(start, position)
        if found >= 0:
            text = buffer[position:found]
            self._emit_content(text.rstrip())
            self._spacing = text[len(text.rstrip()):]  # dropped if this is a call
            self._call, self._announced = _CallReader(self.format), False
            if self.format.start_is_json:  # the reader reads the start as the object's first characters
                return found
            self._call.raw = start
            return found + len(start)
        cut = len(buffer) - _partial_suffix(buffer, position, start)
        while cut > position and buffer[cut - 1].isspace():
            cut -= 1
        self._emit_content(buffer[position:cut])
        self._held = buffer[cut:]
        return len(buffer)

    def _emit_content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip(self._between)
            self._after_call = not text
        if not text:
            return
        self._content.append(text)
        if self._out and isinstance(self._out[-1], str):
            self._out[-1] += text
        else:
            self._out.append(text)

    # -- inside a call

    def _read_call(self, buffer: str, position: int) -> tuple[str, int]:
        reader = self._call
        status = _CONTINUE
        while position < len(buffer):
            status = reader.feed(buffer[position])
            if status in (_BROKEN, _CLOSED):  # not part of the call
                break
            position += 1
            if status == _DONE:
                break
        self._sync_call()
        if status == _CONTINUE:
            return buffer, position
        self._call = None
        if not self._announced:
            return self._not_a_call(reader) + buffer[position:], 0
        if not reader.has_arguments:
            self._emit_arguments("{}")  # a call without arguments takes none
        self._after_call = True
        # A call ends at its object when what follows is not the format's end: that text is re-read.
        return reader.unmatched + buffer[position:], 0

    def _not_a_call(self, reader: "_CallReader") -> str:
        """A call that ended before its name was read was text: its first character is content, and what
        follows is read again (it may hold the start of a real call)."""
        self._emit_content(self._spacing + reader.raw[:1])
        return reader.raw[1:]

    def _sync_call(self) -> None:
        """Announces the call once its name is read, then sends the arguments read since."""
        reader = self._call
        if reader.name is None:
            return
        if not self._announced:
            self._announced = True
            call = ParsedToolCall(new_call_id(), reader.name, "")
            self.calls.append(call)
            self._out.append(ToolCallDelta(len(self.calls) - 1, "", call.id, call.name))
        if reader.arguments:
            self._emit_arguments("".join(reader.arguments))
            reader.arguments.clear()

    def _emit_arguments(self, text: str) -> None:
        index = len(self.calls) - 1
        self.calls[index].arguments += text
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallDelta) and last.index == index and last.id is None:
            last.arguments += text
        else:
            self._out.append(ToolCallDelta(index, text))


def _partial_suffix(text: str, position: int, marker: str) -> int:
    """The length of the longest end of text[position:] that begins `marker` (shorter than it)."""
    for n in range(min(len(marker) - 1, len(text) - position), 0, -1):
        if marker.startswith(text[len(text) - n:]):
            return n
    return 0


# What one character did to a call: it continues, it ended it (consumed), it ended it without being part of
# it (the object closed and no end marker follows), or it cannot continue it (not consumed).
_CONTINUE, _DONE, _CLOSED, _BROKEN = range(4)
_WHITESPACE = " \t\r\n"


@dataclass
class _CallReader:
    """Reads one call's JSON object, and the format's end marker after it, a character at a time. Only the
    top level is parsed (its keys, the name's value); the arguments' value is followed just closely enough
    (strings, nesting) to know where it ends, and kept as the text it was generated as."""

    format: ToolCallFormat
    raw: str = ""  # every character consumed (released as content if the call never had a name)
    name: str | None = None
    arguments: list[str] = field(default_factory=list)  # arguments' characters not yet handed on
    has_arguments: bool = False
    unmatched: str = ""  # after _CLOSED: the beginning of an end marker that did not follow
    _state: str = "open"
    _key: list[str] = field(default_factory=list)
    _value: list[str] = field(default_factory=list)
    _value_key: str = ""
    _depth: int = 0  # nesting inside the current value
    _in_string: bool = False
    _escaped: bool = False
    _scalar: bool = False
    _matched: int = 0  # characters of the end marker matched

    def feed(self, char: str) -> int:
        status = self._step(char)
        if status in (_CONTINUE, _DONE):
            self.raw += char
        return status

    def _step(self, char: str) -> int:
        state = self._state
        if state == "value_chars":
            if self._value_char(char):
                return _CONTINUE
            state = self._state  # a scalar ended at this character, which belongs to what follows it
        if state in ("open", "key_or_close", "colon", "value", "comma_or_close") and char in _WHITESPACE:
            return _CONTINUE
        if state == "open":
            return self._go("key_or_close") if char == "{" else _BROKEN
        if state == "key_or_close":
            if char == '"':
                self._key.clear()
                return self._go("key")
            return self._close() if char == "}" else _BROKEN
        if state == "key":
            return self._key_char(char)
        if state == "colon":
            return self._go("value") if char == ":" else _BROKEN
        if state == "value":
            return self._start_value(char)
        if state == "comma_or_close":
            if char == ",":
                return self._go("key_or_close")
            return self._close() if char == "}" else _BROKEN
        return self._end_char(char)  # "end"

    def _go(self, state: str) -> int:
        self._state = state
        return _CONTINUE

    def _key_char(self, char: str) -> int:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            try:
                self._value_key = json.loads('"' + "".join(self._key) + '"')
            except ValueError:
                return _BROKEN
            return self._go("colon")
        self._key.append(char)
        return _CONTINUE

    def _start_value(self, char: str) -> int:
        self._value.clear()
        self._depth, self._in_string, self._scalar = 0, False, False
        if self._value_key in ARGUMENTS_KEYS and not self.has_arguments:
            self.has_arguments = True
        elif self._value_key in ARGUMENTS_KEYS:
            self._value_key = ""  # a second arguments value is read past, not added to the first
        if char in "{[":
            self._depth = 1
        elif char == '"':
            self._in_string = True
        elif char in "}],:":
            return _BROKEN
        else:
            self._scalar = True
        self._keep(char)
        return self._go("value_chars")

    def _value_char(self, char: str) -> bool:
        """Whether `char` belongs to the current value (False: the value ended just before it)."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if self._depth == 0:
                    self._keep(char)
                    return self._end_value()
        elif self._scalar:
            if char in _WHITESPACE or char in ",}]":
                self._end_value()
                return False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._keep(char)
                return self._end_value()
        self._keep(char)
        return True

    def _keep(self, char: str) -> None:
        if self._value_key in ARGUMENTS_KEYS:
            self.arguments.append(char)
        elif self._value_key == "name":
            self._value.append(char)

    def _end_value(self) -> bool:
        if self._value_key == "name" and self.name is None:
            try:
                name = json.loads("".join(self._value))
            except ValueError:
                name = None
            self.name = name if isinstance(name, str) and name else None
        self._state = "comma_or_close"
        return True

    def _close(self) -> int:
        if not self.format.end:
            return _DONE
        self._matched = 0
        return self._go("end")

    def _end_char(self, char: str) -> int:
        end = self.format.end.strip()  # after any whitespace
        if self._matched == 0 and char in _WHITESPACE:
            return _CONTINUE
        if char == end[self._matched]:
            self._matched += 1
            return _DONE if self._matched == len(end) else _CONTINUE
        self.unmatched = end[: self._matched]
        return _CLOSED
