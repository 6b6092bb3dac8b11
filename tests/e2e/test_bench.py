"""`llamaserve bench` against the session's real server, as a user runs it: a small concurrency sweep
(chat), a Poisson-rate point (completions), a run whose requests all fail, and a plot of two result files."""

import json
import subprocess
import sys

import pytest


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaserve.cli", "bench", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


SMALL = ("--requests", "3", "--max-input-tokens", "120", "--max-output-tokens", "4")


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = bench("--url", server.url, "--concurrency", "1,2", *SMALL, "--label", "ours",
                "--output", str(out / "sweep.json"), "--plot", str(out / "sweep.png"))
    assert run.returncode == 0, run.stderr
    return run, json.loads((out / "sweep.json").read_text()), out


def test_a_concurrency_sweep_records_every_request(sweep, model):
    run, result, out = sweep
    assert result["model"] == model and result["label"] == "ours" and result["sweep"]["kind"] == "concurrency"
    assert [p["concurrency"] for p in result["points"]] == [1, 2]
    assert "concurrency 1: 3/3 ok" in run.stdout and "concurrency 2: 3/3 ok" in run.stdout
    for point in result["points"]:
        s = point["summary"]
        assert s["failed"] == 0 and s["output_tokens"] == s["expected_output_tokens"] > 0
        assert s["output_throughput"] > 0 and s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0
        assert s["e2e_ms"]["p99"] >= s["e2e_ms"]["p50"] >= s["ttft_ms"]["p50"]
        for r in point["records"]:
            assert r["status"] == 200 and r["error"] is None and len(r["itl_s"]) == r["output_tokens"] - 1
            assert r["input_tokens"] > 0 and r["e2e_s"] >= r["ttft_s"] > 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_poisson_rate_point_on_completions(server, tmp_path):
    run = bench("--url", server.url, "--request-rate", "inf", "--endpoint", "completions", *SMALL, "--warmup", "0",
                "--output", str(tmp_path / "rate.json"))
    assert run.returncode == 0, run.stderr
    [point] = json.loads((tmp_path / "rate.json").read_text())["points"]
    assert point["request_rate"] == "inf" and point["summary"]["completed"] == 3
    assert max(r["start_s"] for r in point["records"]) < 1.0  # all sent at once


def test_failures_are_counted_with_the_servers_reason(server, tmp_path):
    run = bench("--url", server.url, "--model", "no-such-model", "--concurrency", "2", *SMALL, "--warmup", "0",
                "--output", str(tmp_path / "failed.json"))
    assert run.returncode == 0 and "3 requests failed" in run.stderr
    [point] = json.loads((tmp_path / "failed.json").read_text())["points"]
    assert point["summary"]["failed"] == 3 and point["summary"]["output_throughput"] == 0
    [(error, count)] = point["summary"]["errors"].items()
    assert count == 3 and error.startswith("HTTP 404") and "no-such-model" in error


def test_result_files_plot_together(sweep, tmp_path):
    _, result, out = sweep
    other = {**result, "label": "theirs"}
    (tmp_path / "theirs.json").write_text(json.dumps(other))
    run = bench("--results", str(out / "sweep.json"), str(tmp_path / "theirs.json"), "--plot",
                str(tmp_path / "compare.png"), "--title", "ours vs theirs")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "compare.png").stat().st_size < 100_000
    assert bench("--results", str(out / "sweep.json")).returncode == 2  # no --plot
    assert bench().returncode == 2  # neither --url nor --results
