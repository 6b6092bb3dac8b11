"""Batched token sampling: one pass over a whole engine step's logits, no host sync.

Order of operations per row (a stage runs only if some row of the step uses it):
  1. logit bias: logits[token] += bias
  2. repetition penalty (CTRL): for tokens present in the prompt or the output, positive logits
     are divided by the penalty and negative logits multiplied by it
  3. presence / frequency penalties (OpenAI): logit -= presence * (count > 0) + frequency * count,
     counting output tokens only
  4. grammar (structured output): on constrained rows, every token the row's bitmask forbids gets
     -inf. After bias and penalties, so that no bias can revive a forbidden token.
     -> logprobs are the log-softmax of these logits, before temperature and filtering, as vLLM
        and the OpenAI API report them: they describe the model's (penalized, constrained)
        distribution, not the truncated one the token was drawn from.
  5. greedy rows (temperature below 1e-5, top_k 1 or top_p 0): argmax
  6. other rows: divide by temperature; top-k, top-p (one shared cut: see top_k_top_p); softmax; min-p
  7. draw by the inverse CDF: the first token whose cumulative probability exceeds u times the
     row's total, u ~ U[0, 1): a multinomial draw from one uniform a row, with no host sync (the
     exponential race it replaces, argmax(probs / q) with q ~ Exp(1), drew one a token: a
     millisecond a row over a 49k vocabulary on the CPU). Seeded rows draw u from their own
     torch.Generator (which must live on the logits' device), so their tokens do not depend
     on the rest of the batch; a seeded row that is greedy does not advance its generator.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from llamaserve.sampling_params import SamplingParams

from .staging import Staged, StagingBuffer


@dataclass
class SamplingBatch:
    """One step's sampling inputs; a field is None when no request in the step uses the feature."""

    all_greedy: bool
    greedy_mask: Tensor | None  # [num_seqs] bool; None when no row or every row is greedy
    temperature: Tensor | None  # [num_seqs, 1]; 1.0 on greedy rows
    top_k: Tensor | None  # [num_seqs, 1] long; vocab_size where off
    top_p: Tensor | None  # [num_seqs, 1]; inf where off, so float error in the cumsum never masks
    min_p: Tensor | None  # [num_seqs, 1]; 0.0 where off
    bias: tuple[Tensor, Tensor, Tensor] | None  # (rows, token ids, values), each [num_biases]
    penalty_rows: Tensor | None  # [num_pen] long: the rows that use any penalty
    repetition_penalty: Tensor | None  # [num_pen, 1]
    seen_mask: Tensor | None  # [num_pen, vocab] bool: token in the prompt or the output
    presence_penalty: Tensor | None  # [num_pen, 1]
    frequency_penalty: Tensor | None  # [num_pen, 1]
    output_counts: Tensor | None  # [num_pen, vocab] float32
    seeded: list[tuple[int, torch.Generator]]  # (row, generator) for sampled rows with a seed
    max_logprobs: int | None  # k of top_logprobs; None when no row asked for logprobs
    grammar_rows: Tensor | None = None  # [num_constrained] long: the rows a grammar constrains
    # [num_constrained, ceil(vocab / 32)] int32: bit j of word i set = token 32 i + j allowed
    grammar_bitmask: Tensor | None = None

    @property
    def needs_processing(self) -> bool:
        return (self.bias is not None or self.penalty_rows is not None or self.max_logprobs is not None
                or self.grammar_rows is not None)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        grammar_rows: list[int] | None = None,
        grammar_bitmask: Tensor | None = None,
    ) -> "SamplingBatch":
        """`grammar_rows` and `grammar_bitmask` ([len(grammar_rows), ceil(vocab / 32)] int32, on the host
        or the device): the constrained rows and their allowed tokens (see llamaserve.engine.grammar).
        Penalty counts are counted here from the token lists; the engine keeps them on the device instead
        (llamaserve.engine.runner.sampling) and goes through `stage`."""
        if not len(params) == len(generators) == len(prompt_token_ids) == len(output_token_ids):
            raise ValueError("params, generators and token id lists must have one entry per row")
        staging = StagingBuffer(device, capacity=1 << 12).begin()
        staged = cls.stage(params, generators, vocab_size, staging, grammar_rows)
        staging.send()
        output_counts = seen_mask = None
        pen = staged.penalty_rows
        if pen:
            output_counts = _token_counts([output_token_ids[r] for r in pen], vocab_size, device)
            if staged.use_repetition:
                seen_mask = (_token_counts([prompt_token_ids[r] for r in pen], vocab_size, device) > 0) \
                    | (output_counts > 0)
        return staged.on_device(output_counts, seen_mask, grammar_bitmask)

    @staticmethod
    def stage(
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        vocab_size: int,
        staging: StagingBuffer,
        grammar_rows: list[int] | None = None,
    ) -> "StagedSampling":
        """The step's sampling tensors written into `staging` before the forward pass; the batch itself comes
        from StagedSampling.on_device once the buffer is sent."""
        if len(params) != len(generators):
            raise ValueError("params and generators must have one entry per row")

        def column(values, dtype=torch.float32) -> Staged:  # [len(values), 1]
            return staging.put([[v] for v in values], dtype)

        greedy = [p.greedy for p in params]
        sampled = [p for p in params if not p.greedy]
        all_greedy, any_greedy = all(greedy), any(greedy)
        fields: dict[str, Staged] = {}

        bias_entries = [(row, tid, b) for row, p in enumerate(params) for tid, b in p.logit_bias.items()]
        if any(not 0 <= tid < vocab_size for _, tid, _ in bias_entries):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
        if bias_entries:
            rows, tids, values = zip(*bias_entries)
            fields.update(bias_rows=staging.put(rows), bias_tokens=staging.put(tids),
                          bias_values=staging.put(values, torch.float32))

        pen = [row for row, p in enumerate(params) if p.needs_penalties]
        pen_params = [params[row] for row in pen]
        use_rep = any(p.repetition_penalty != 1 for p in pen_params)
        use_counts = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in pen_params)
        if pen:
            fields["penalty_rows"] = staging.put(pen)
        if use_rep:
            fields["repetition_penalty"] = column([p.repetition_penalty for p in pen_params])
        if use_counts:
            fields["presence_penalty"] = column([p.presence_penalty for p in pen_params])
            fields["frequency_penalty"] = column([p.frequency_penalty for p in pen_params])
        if any_greedy and not all_greedy:
            fields["greedy_mask"] = staging.put(greedy, torch.bool)
        if any(p.temperature != 1 for p in sampled):
            fields["temperature"] = column([1.0 if p.greedy else p.temperature for p in params])
        if any(p.top_k for p in sampled):
            fields["top_k"] = column([min(p.top_k or vocab_size, vocab_size) for p in params], torch.int64)
        if any(p.top_p < 1 for p in sampled):
            # At least float32's smallest normal: a top_p that rounds to 0 would mask the top token too.
            fields["top_p"] = column([max(p.top_p, torch.finfo(torch.float32).tiny) if p.top_p < 1 and not p.greedy
                                      else float("inf") for p in params])
        if any(p.min_p > 0 for p in sampled):
            fields["min_p"] = column([p.min_p for p in params])
        if grammar_rows:
            fields["grammar_rows"] = staging.put(grammar_rows)
        return StagedSampling(
            all_greedy=all_greedy, fields=fields, penalty_rows=pen, use_repetition=use_rep, use_counts=use_counts,
            seeded=[(row, g) for row, g in enumerate(generators) if g is not None and not greedy[row]],
            max_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
        )


@dataclass
class StagedSampling:
    """A step's sampling inputs staged before the forward pass; a SamplingBatch once the staging buffer is sent."""

    all_greedy: bool
    fields: dict[str, Staged]  # SamplingBatch's tensor fields (bias in three parts), as staged
    penalty_rows: list[int]  # the rows that use any penalty
    use_repetition: bool  # some penalty row has a repetition penalty: the batch needs seen_mask
    use_counts: bool  # some penalty row has a presence or frequency penalty: the batch needs output_counts
    seeded: list[tuple[int, torch.Generator]]
    max_logprobs: int | None

    def on_device(self, output_counts: Tensor | None = None, seen_mask: Tensor | None = None,
                  grammar_bitmask: Tensor | None = None) -> SamplingBatch:
        """`output_counts` ([num_pen, vocab] float32) and `seen_mask` ([num_pen, vocab] bool, token in the prompt
        or the output): the penalty rows' counts, needed when the stage found them used; `grammar_bitmask`
        for the grammar rows, on the host (pinned) or the device."""
        t = {name: staged.tensor() for name, staged in self.fields.items()}
        bias = None
        if "bias_rows" in t:
            bias = (t["bias_rows"], t["bias_tokens"], t["bias_values"])
        grammar_rows = t.get("grammar_rows")
        if grammar_rows is not None:
            grammar_bitmask = grammar_bitmask.to(grammar_rows.device, non_blocking=True)
        return SamplingBatch(
            all_greedy=self.all_greedy, greedy_mask=t.get("greedy_mask"), temperature=t.get("temperature"),
            top_k=t.get("top_k"), top_p=t.get("top_p"), min_p=t.get("min_p"), bias=bias,
            penalty_rows=t.get("penalty_rows"), repetition_penalty=t.get("repetition_penalty"),
            seen_mask=seen_mask if self.use_repetition else None, presence_penalty=t.get("presence_penalty"),
            frequency_penalty=t.get("frequency_penalty"), output_counts=output_counts if self.use_counts else None,
            seeded=self.seeded, max_logprobs=self.max_logprobs, grammar_rows=grammar_rows,
            grammar_bitmask=grammar_bitmask if grammar_rows is not None else None,
        )


def _token_counts(token_ids: list[list[int]], vocab_size: int, device) -> Tensor:
    """[len(token_ids), vocab] float32 occurrence counts from one scatter_add.

    Rows are padded with an extra id (vocab_size) whose bin is dropped afterwards.
    """
    width = max(map(len, token_ids), default=0)
    padded = [ids + [vocab_size] * (width - len(ids)) for ids in token_ids]
    padded = torch.tensor(padded, dtype=torch.long).view(len(token_ids), width).to(device)  # [rows, width]
    counts = torch.zeros(len(token_ids), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def forbidden_tokens(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[rows, ceil(vocab / 32)] int32 -> [rows, vocab] bool, True where the bit of the token (bit j of word i
    is token 32 i + j) is clear."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]; & 1 drops the sign's copies
    return (bits == 0).flatten(1)[:, :vocab_size]


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Logit bias, then repetition, presence and frequency penalties, then grammar masks; returns a new
    float32 tensor."""
    logits = logits.to(torch.float32, copy=True)  # [num_seqs, vocab]; the caller's logits stay intact
    if batch.bias is not None:
        rows, tids, values = batch.bias
        logits.index_put_((rows, tids), values, accumulate=True)
    if batch.penalty_rows is not None:
        pen = logits.index_select(0, batch.penalty_rows)  # [num_pen, vocab]
        if batch.repetition_penalty is not None:
            rep = batch.repetition_penalty
            penalized = torch.where(pen > 0, pen / rep, pen * rep)
            pen = torch.where(batch.seen_mask, penalized, pen)
        if batch.output_counts is not None:
            counts = batch.output_counts
            pen = pen - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0)
        logits.index_copy_(0, batch.penalty_rows, pen)
    if batch.grammar_rows is not None:
        forbidden = forbidden_tokens(batch.grammar_bitmask, logits.shape[-1])  # [num_constrained, vocab]
        if len(batch.grammar_rows) == len(logits):  # every row (n choices of one request): no gather
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            constrained = logits.index_select(0, batch.grammar_rows).masked_fill_(forbidden, float("-inf"))
            logits.index_copy_(0, batch.grammar_rows, constrained)
    return logits


def filter_probs(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Temperature, top-k, top-p, then min-p; returns probabilities (masked tokens 0). Edits logits."""
    if batch.temperature is not None:
        logits.div_(batch.temperature)
    if batch.top_k is not None or batch.top_p is not None:
        logits = top_k_top_p(logits, batch.top_k, batch.top_p)
    probs = logits.softmax(dim=-1)  # [num_seqs, vocab]
    if batch.min_p is not None:
        # Zeroing without renormalizing is enough: the draw scales u by each row's total.
        threshold = batch.min_p * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < threshold, 0.0)
    return probs


CANDIDATES = (256, 4096)  # how many of a row's most likely tokens to cut from, before sorting it in full


def top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """logits [num_seqs, vocab] with every token outside its row's top k, then outside the smallest set of most
    likely tokens whose probability reaches top_p (among those k), at -inf; edited in place.

    On the CPU a full sort of a 49k vocabulary costs ~3.5 ms a row (more than a decode step at 16 rows), so there
    a row is cut from its 256 most likely tokens (or its top k, if more), which is exact when they hold its top k
    or reach top_p; else from 4,096; else it is sorted. (Its sums run in another order than the sort's: where a
    row's probability crosses top_p within float32 rounding, the two may keep a token more or less.) For the
    default model over tests/data/perplexity.txt at temperature 1 and top_p 0.95, 256 tokens reach it at 70% of
    positions and 4,096 at 99.9% (bench/RESULTS.md)."""
    if logits.device.type != "cpu":
        return _sorted_top_k_top_p(logits, top_k, top_p)
    vocab = logits.shape[-1]
    restricted = torch.zeros(len(logits), dtype=torch.bool) if top_k is None else top_k.squeeze(-1) < vocab
    nucleus = torch.zeros_like(restricted) if top_p is None else torch.isfinite(top_p.squeeze(-1))
    rows = (restricted | nucleus).nonzero().squeeze(-1)  # the rows with a cut to make
    for width in CANDIDATES:
        if not rows.numel():
            return logits
        k = None if top_k is None else top_k[rows]
        cut, exact = _cut_from_candidates(logits[rows], k, None if top_p is None else top_p[rows],
                                          restricted[rows], width)
        logits[rows[exact]] = cut[exact]
        rows = rows[~exact]
    if rows.numel():
        logits[rows] = _sorted_top_k_top_p(logits[rows], None if top_k is None else top_k[rows], top_p[rows])
    return logits


def _cut_from_candidates(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, restricted: Tensor,
                         width: int) -> tuple[Tensor, Tensor]:
    """(logits cut as top_k_top_p cuts them, from each row's `width` most likely tokens or its top k if more;
    [rows] bool: where that is exact). `restricted`: [rows] bool, the rows with a top k below the vocabulary."""
    vocab = logits.shape[-1]
    width = min(vocab, max([width, *top_k[restricted].squeeze(-1).tolist()] if top_k is not None else [width]))
    values, order = logits.topk(width, dim=-1)  # [rows, width], most likely first
    if top_k is not None:
        values.masked_fill_(torch.arange(width) >= top_k, float("-inf"))  # exactly k survive, ties too
    exact = restricted.clone() if width < vocab else torch.ones_like(restricted)
    if top_p is not None:
        # Probabilities over the row's top k where it has one, else over the whole vocabulary.
        total = torch.where(restricted, values.logsumexp(-1), logits.logsumexp(-1)).unsqueeze(-1)  # [rows, 1]
        probs = (values - total).exp_()
        mass_before = probs.cumsum(dim=-1) - probs  # exclusive, so the top token stays
        values.masked_fill_(mass_before >= top_p, float("-inf"))
        exact |= probs.sum(-1) >= top_p.squeeze(-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, values), exact


def _sorted_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """top_k_top_p by a full sort of every row, `logits` edited (no host sync: the GPU's path)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_seqs, vocab]
    if top_k is not None:
        rank = torch.arange(logits.shape[-1], device=logits.device)  # [vocab]
        sorted_logits.masked_fill_(rank >= top_k, float("-inf"))  # exactly k survive, ties too
    if top_p is not None:
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive, so the top token stays
        sorted_logits.masked_fill_(mass_before >= top_p, float("-inf"))
    return logits.scatter_(-1, order, sorted_logits)


def _inverse_cdf(probs: Tensor, seeded: list[tuple[int, torch.Generator]]) -> Tensor:
    """One token a row of probs [num_seqs, vocab] (not normalised; masked tokens 0), its cumulative sums in place."""
    cdf = probs.cumsum_(dim=-1)
    total = cdf[:, -1:]  # [num_seqs, 1]
    u = torch.rand(len(cdf), 1, device=cdf.device)  # one draw for the unseeded rows
    for row, generator in seeded:  # a cheap call per seeded row buys batch-independent tokens
        u[row] = torch.rand(1, generator=generator, device=cdf.device)
    # Below the total, so some token's cumulative sum exceeds it: the first, whose own probability is not 0.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [num_seqs] long
    logprobs: Tensor | None = None  # [num_seqs] float32: log-softmax of the sampled token (see module doc)
    top_logprobs: tuple[Tensor, Tensor] | None = None  # (values, ids), each [num_seqs, max_logprobs]


class Sampler:
    """Stateless: everything per step lives in the SamplingBatch."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.all_greedy and not batch.needs_processing:
            return SamplerOutput(logits.argmax(dim=-1))  # argmax is exact in any float dtype
        logits = process_logits(logits, batch)  # [num_seqs, vocab] float32
        logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs is not None else None
        greedy_ids = logits.argmax(dim=-1) if batch.all_greedy or batch.greedy_mask is not None else None
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            token_ids = _inverse_cdf(filter_probs(logits, batch), batch.seeded)
            if greedy_ids is not None:
                token_ids = torch.where(batch.greedy_mask, greedy_ids, token_ids)
        out = SamplerOutput(token_ids)
        if logprobs is not None:
            out.logprobs = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
            out.top_logprobs = tuple(logprobs.topk(batch.max_logprobs, dim=-1))
        return out
