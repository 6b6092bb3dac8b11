"""Chat templates: conversations rendered to prompt text in a sandboxed Jinja environment.

Templates come with downloaded checkpoints, so they are untrusted code: they run in Jinja's immutable
sandbox, and any reach for Python internals (`__class__`, `__globals__`, mutating methods, ...)
raises ChatTemplateError instead of quietly rendering an empty string.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# Meta's Llama 2 chat format (llama/generation.py: chat_completion). Each turn is
# "<s>[INST] {user} [/INST] {answer} </s>"; the system prompt is folded into the first user
# message and, as in Meta's code, the folded content is stripped as a whole.
LLAMA_2_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if not messages -%}
    {{ raise_exception('llama-2: the conversation needs a user message') }}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
        {{ raise_exception('llama-2: roles must alternate user/assistant/user/... after an optional system '
                           ~ 'message, but message ' ~ loop.index0 ~ ' after it is ' ~ message['role']) }}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {%- set content = message['content'] -%}
        {%- if loop.first and system is defined -%}
            {%- set content = '<<SYS>>\n' ~ system ~ '\n<</SYS>>\n\n' ~ content -%}
        {%- endif -%}
        {{ '<s>[INST] ' ~ content.strip() ~ ' [/INST]' }}
    {%- else -%}
        {{ ' ' ~ message['content'].strip() ~ ' </s>' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and messages[-1]['role'] != 'user' -%}
    {{ raise_exception('llama-2: the last message must be from the user to generate an answer') }}
{%- endif -%}
"""

BUILTIN_TEMPLATES = {"llama-2": LLAMA_2_TEMPLATE}


class ChatTemplateError(ValueError):
    """A chat template that cannot render these messages: bad syntax, a rejected conversation, or an
    attempt to escape the sandbox."""


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str):
        # Jinja's default returns an Undefined that renders as "" until used further; fail loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is not allowed")


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; templates expect plain JSON (as in transformers).
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
_ENV.filters["tojson"] = _tojson


@lru_cache(maxsize=32)
def _compile(source: str):
    try:
        return _ENV.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def load_chat_template(spec: str | Path) -> str:
    """Template source for a built-in name ("llama-2") or a path to a .jinja file."""
    if isinstance(spec, str) and spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"chat template {str(spec)!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    return path.read_text()


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages with content as one string: OpenAI text parts are concatenated,
    null content (an assistant turn with only tool calls) becomes ""."""
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be an object with a string 'role'")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise ValueError(f"message {i}: only text content parts are supported, got {kind!r}")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of text parts")
        normalized.append({**message, "content": content})
    return normalized


def render_chat_template(
    source: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
) -> str:
    """Render messages with a template's source; `variables` (bos_token, eos_token, ...) are passed
    to the template as transformers does."""
    template = _compile(source)
    try:
        return template.render(
            messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt, **variables
        )
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError) as e:  # SecurityError and UndefinedError are TemplateErrors
        raise ChatTemplateError(f"chat template failed: {e}") from e
