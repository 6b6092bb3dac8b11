"""Rotary position embeddings with Llama's scaling variants (linear, dynamic NTK, llama3)."""

import math

import torch

from .architecture import ModelArchitecture


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (theta**exponents)  # [dim / 2]


def llama3_inv_freq(inv_freq: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    """Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended."""
    s = arch.rope_scaling
    old_len = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Produces cos/sin for a flat batch of positions once per forward; every layer reuses them."""

    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.dim = arch.head_dim
        self.theta = arch.rope_theta
        self.scaling = arch.rope_scaling
        self.max_positions = arch.max_position_embeddings
        inv_freq = base_inv_freq(self.theta, self.dim)
        if self.scaling.rope_type == "linear":
            inv_freq = inv_freq / self.scaling.factor
        elif self.scaling.rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, arch)
        # A plain float32 attribute, not a buffer: it must survive meta-device construction and
        # never be cast to the weights' dtype.
        self.inv_freq = inv_freq  # [dim / 2]
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # on CPU, by dtype

    def dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Dynamic NTK: a sequence longer than the trained context gets a larger base, chosen from its
        own length (so a request's rotation never depends on what else shares the batch)."""
        factor = self.scaling.factor
        seq_lens = seq_lens.clamp(min=self.max_positions).float()  # [num_tokens]
        base = self.theta * ((factor * seq_lens / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=seq_lens.device).float() / self.dim
        return 1.0 / (base[:, None] ** exponents[None, :])  # [num_tokens, dim / 2]

    def forward(self, positions: torch.Tensor, seq_lens: torch.Tensor | None, dtype: torch.dtype):
        """positions: [num_tokens]; seq_lens: [num_tokens], the length of each token's sequence after this
        step (used by dynamic NTK only). Returns cos, sin: [num_tokens, 1, head_dim] in `dtype`, laid out
        for `apply_rotary` (sin's first half negated), once per step for every layer and head. On CPU, rows
        of a table of every position so far (the same values: each row is computed alone): computing them
        cost a small decode step some 80 us a step."""
        if self.scaling.rope_type == "dynamic":
            return self._cos_sin(positions.float()[:, None] * self.dynamic_inv_freq(seq_lens), dtype)
        if positions.device.type == "cpu":
            cos, sin = self._table(int(positions.max()) + 1 if positions.numel() else 0, dtype)
            return cos[positions], sin[positions]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return self._cos_sin(positions.float()[:, None] * self.inv_freq[None, :], dtype)

    @staticmethod
    def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = freqs.cos(), freqs.sin()  # [num_tokens, head_dim / 2]
        return (torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1),
                torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1))

    def _table(self, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows >= positions, 1, head_dim] in `dtype` for positions 0, 1, ... (CPU), grown by doubling."""
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < positions:
            rows = max(1024, positions, 2 * (0 if table is None else table[0].shape[0]))
            freqs = torch.arange(rows, dtype=torch.int64).float()[:, None] * self.inv_freq.cpu()[None, :]
            table = self._tables[dtype] = self._cos_sin(freqs, dtype)
        return table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, head_dim] from RotaryEmbedding.
    Rotate-half: x * cos + (-x2, x1) * (sin, sin), written as a roll by half a head with sin's sign folded in
    (three ops on the whole tensor instead of two slices, a negation and a concatenation more)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
