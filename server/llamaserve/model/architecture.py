"""The shape of a Llama-family model, read from a checkpoint's config.json or a deployment YAML."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"  # default | linear | dynamic (NTK) | llama3
    factor: float = 1.0  # context stretch factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and self.factor <= 0:
            raise ValueError("rope scaling factor must be > 0")
        if self.rope_type == "llama3" and self.original_max_position_embeddings is None:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")


@dataclass(frozen=True)
class ModelArchitecture:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArchitecture":
        """Both config.json forms: Llama 2's `rope_theta` + `rope_scaling`, transformers 5's `rope_parameters`."""
        if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in cfg.get(
            "architectures", []
        ):
            raise ValueError(f"not a Llama-architecture checkpoint (model_type={cfg.get('model_type')!r})")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"{flag}=true is not supported")
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope.update(cfg.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=rope.get("original_max_position_embeddings"),
        )
        eos = cfg.get("eos_token_id", 2)
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ModelArchitecture":
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelArchitecture":
        """The `architecture:` section of a deployment config (configs/*.yaml), in config.json's terms."""
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("architecture")
        if not section:
            raise ValueError(f"{path}: no `architecture:` section")
        return cls.from_dict(section)
