"""The checkpoint's fast tokenizer, its special tokens and its chat template.

Built on the `tokenizers` library directly rather than transformers' AutoTokenizer: the API process
then never imports torch (transformers does), and tokenizer.json is used exactly as the checkpoint
ships it.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from .chat_template import ChatTemplateError, load_chat_template, render_chat_template


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus chat prompts.

    BOS rule for chat prompts: the rendered text is encoded without the tokenizer's special tokens,
    so a BOS written by the template (its "<s>" per turn, matched as the special token) is never
    doubled. Only when the rendered text does not start with the BOS token and the tokenizer
    normally adds one (Llama 2's SentencePiece tokenizer does) is a single BOS id put in front,
    as plain `encode` would.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        generation_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        name: str = "tokenizer",
    ):
        self._backend = backend
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self._eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self._eos_token_ids = frozenset(generation_eos_token_ids) | (
            {self._eos_token_id} if self._eos_token_id is not None else set()
        )
        # Whether plain encode() puts BOS first (a post-processor such as Llama's "<s> $A").
        self._adds_bos = self._bos_token_id is not None and backend.encode("").ids[:1] == [self._bos_token_id]
        self.chat_template = chat_template
        self.name = name

    @classmethod
    def from_checkpoint(cls, path: str | Path, chat_template: str | Path | None = None) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json) from a checkpoint directory. `chat_template` is a
        built-in name ("llama-2"), a .jinja file, or None for the checkpoint's own template (the
        chat_template.jinja file, else tokenizer_config.json's), if it has one."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json (a fast tokenizer); convert a SentencePiece-only checkpoint with "
                "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        # Some tokenizer.json files carry truncation/padding settings meant for training.
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "tokenizer_config.json")
        if chat_template is not None:
            template = load_chat_template(chat_template)
        else:
            template = _checkpoint_template(path, config)
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            generation_eos_token_ids=_generation_eos_ids(path),
            chat_template=template,
            name=path.name,
        )

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's EOS and the checkpoint's generation EOS ids."""
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """`tools` (OpenAI's tool objects) are passed to the template only when given, as transformers does."""
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self.name} has no chat template; choose one (a built-in such as 'llama-2', or a .jinja file)"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token or "",
            eos_token=self._eos_token or "",
            **({"tools": list(tools)} if tools is not None else {}),
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Prompt token ids for a conversation; see the class docstring for the BOS rule."""
        text = self.render_chat(messages, add_generation_prompt, tools)
        ids = self.encode(text, add_special_tokens=False)
        if self._adds_bos and not text.startswith(self._bos_token):
            ids.insert(0, self._bos_token_id)
        return ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _checkpoint_template(path: Path, config: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _generation_eos_ids(path: Path) -> set[int]:
    """EOS ids from config.json and generation_config.json (an int or a list in either)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        eos = _read_json(path / name).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    return ids
