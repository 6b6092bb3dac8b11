"""From per-request records to a point's summary: throughput, and TTFT, ITL, TPOT and end-to-end latency
percentiles, as vLLM's benchmark_serving defines them.

- TTFT: request sent -> first text received.
- ITL: the gaps between text chunks after the first (one per gap; a server that sends several tokens in a
  chunk makes fewer, longer gaps).
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request with at least two output tokens.
- Throughputs divide by the point's wall time, first request sent to last answer received.
"""

from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    index: int  # in the point's request list
    start_s: float  # when it was sent, from the point's start
    input_tokens: int  # as the server counted them (usage), else the prompt set's count
    expected_output_tokens: int  # max_tokens
    output_tokens: int = 0  # as the server counted them (usage), else the text chunks received
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    status: int | None = None  # HTTP status; None: no response
    error: str | None = None  # None: it completed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "tpot_s": self.tpot_s}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated linearly between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean and percentiles in milliseconds; None when there is no value."""
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    ms = [v * 1000 for v in values_s]
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in PERCENTILES}}


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.input_tokens for r in done)
    per_second = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "errors": errors,
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_output_tokens for r in done),
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done if r.e2e_s is not None]),
    }
