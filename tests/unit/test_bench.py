"""`llamaserve bench` without a server: the shipped prompt set's spread, the request draw, Poisson arrivals,
the summary's arithmetic, and the plots."""

import random
import struct

import numpy as np
import pytest

from llamaserve.bench.load import poisson_arrivals
from llamaserve.bench.plot import plot_results
from llamaserve.bench.prompts import load_prompts, sample_prompts
from llamaserve.bench.summary import RequestRecord, percentile, summarize


def test_the_prompt_set_has_a_realistic_spread_of_lengths():
    prompts = load_prompts()
    assert len(prompts) == 384 and len({p.prompt for p in prompts}) == len(prompts)
    inputs = [p.input_tokens for p in prompts]
    outputs = [p.output_tokens for p in prompts]
    # Long-tailed, as chat traffic is: a median near 200 input and 128 output tokens, a tail several times that.
    assert 150 <= np.median(inputs) <= 250 and np.percentile(inputs, 90) > 2.5 * np.median(inputs)
    assert min(inputs) < 40 and max(inputs) > 1500
    assert 100 <= np.median(outputs) <= 160 and min(outputs) >= 8 and max(outputs) <= 1024
    assert np.percentile(outputs, 90) > 2.5 * np.median(outputs)


def test_the_draw_is_seeded_and_capped():
    prompts = load_prompts()
    first, again, other = (sample_prompts(prompts, 20, seed) for seed in (0, 0, 1))
    assert first == again and first != other and len(set(first)) == 20
    capped = sample_prompts(prompts, 500, 0, max_input_tokens=100, max_output_tokens=16)
    assert len(capped) == 500  # more than the set: drawn again once it is used up
    assert all(p.input_tokens <= 100 and p.output_tokens <= 16 for p in capped)
    with pytest.raises(ValueError):
        sample_prompts(prompts, 1, 0, max_input_tokens=1)


def test_poisson_arrivals():
    times = poisson_arrivals(4000, 8.0, seed=3)
    assert times == poisson_arrivals(4000, 8.0, seed=3) and times[0] == 0
    gaps = np.diff(times)
    assert np.mean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: the deviation equals the mean
    assert poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_percentiles_match_numpy():
    rng = random.Random(0)
    values = [rng.expovariate(1) for _ in range(101)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([7.0], 99) == 7.0


def test_the_summary():
    ok = [RequestRecord(i, 0.0, input_tokens=10, expected_output_tokens=5, output_tokens=5, ttft_s=0.1 * (i + 1),
                        e2e_s=0.1 * (i + 1) + 0.4, itl_s=[0.1] * 4, status=200) for i in range(3)]
    failed = [RequestRecord(3 + i, 0.0, 10, 5, status=429, error="HTTP 429: busy") for i in range(2)]
    summary = summarize(ok + failed, duration_s=2.0)
    assert (summary["requests"], summary["completed"], summary["failed"]) == (5, 3, 2)
    assert summary["errors"] == {"HTTP 429: busy": 2}
    assert summary["output_tokens"] == 15 and summary["output_throughput"] == 7.5
    assert summary["request_throughput"] == 1.5 and summary["total_token_throughput"] == 22.5
    assert summary["ttft_ms"]["p50"] == pytest.approx(200) and summary["ttft_ms"]["mean"] == pytest.approx(200)
    assert summary["tpot_ms"]["p50"] == pytest.approx(100)  # (e2e - ttft) / (tokens - 1)
    assert summary["itl_ms"]["p99"] == pytest.approx(100) and summary["e2e_ms"]["p50"] == pytest.approx(600)
    empty = summarize(failed, 1.0)
    assert empty["ttft_ms"]["p50"] is None and empty["output_throughput"] == 0


def result(label: str, scale: float, kind: str = "concurrency") -> dict:
    points = []
    for c in (1, 4, 16):
        records = [RequestRecord(0, 0.0, 10, 8, 8, 0.05 * c * scale, 0.5 * c * scale, [0.06 * c * scale] * 7, 200)]
        points.append({"concurrency": c if kind == "concurrency" else None,
                       "request_rate": None if kind == "concurrency" else float(c),
                       "summary": summarize(records, 0.5 * scale), "records": []})
    return {"label": label, "sweep": {"kind": kind}, "points": points}


def test_several_results_on_one_small_png(tmp_path):
    path = tmp_path / "compare.png"
    plot_results([result("float32", 1.0), result("bfloat16", 0.7)], path, "two servers")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 100_000
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    plot_results([result("rate", 1.0, "request_rate")], tmp_path / "rate.png")
    with pytest.raises(ValueError, match="cannot share a plot"):
        plot_results([result("a", 1.0), result("b", 1.0, "request_rate")], tmp_path / "mixed.png")
