"""Text side of the server: the checkpoint's tokenizer, sandboxed chat templates, streaming detokenization."""

from .chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    load_chat_template,
    normalize_messages,
    render_chat_template,
)
from .detokenizer import IncrementalDetokenizer
from .stop_strings import StopStringMatcher
from .tokenizer import Tokenizer

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "load_chat_template",
    "normalize_messages",
    "render_chat_template",
]
