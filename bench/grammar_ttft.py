"""Time to first token for a JSON Schema the server has never seen vs one it has compiled before.

    .venv/bin/llamaserve serve --port 8000 &
    .venv/bin/python bench/grammar_ttft.py --url http://127.0.0.1:8000 --schemas 10

Each round sends a schema made new by its title (bench/long_schema.json's, by default), then the same
schema again, one request at a time, streaming, and times the first content token of each; a round
without a schema gives the baseline. Prints the medians.
"""

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import httpx

SCHEMA = Path(__file__).with_name("long_schema.json")


def ttft(http: httpx.Client, schema: dict | None) -> float:
    body = {"messages": [{"role": "user", "content": "Describe some people as JSON."}], "max_tokens": 2,
            "temperature": 0, "stream": True}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    start = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    raise RuntimeError("no token came")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--schemas", type=int, default=10)
    parser.add_argument("--schema", type=Path, default=SCHEMA)
    args = parser.parse_args()
    base = json.loads(args.schema.read_text())
    first, cached, free = [], [], []
    with httpx.Client(base_url=args.url, timeout=120) as http:
        ttft(http, None)  # warm-up
        for _ in range(args.schemas):
            schema = {**base, "title": uuid.uuid4().hex}  # a schema nobody compiled yet
            free.append(ttft(http, None))
            first.append(ttft(http, schema))
            cached.append(ttft(http, schema))
    ms = lambda values: f"{statistics.median(values) * 1000:.0f} ms"  # noqa: E731
    print(f"{args.schemas} rounds, median TTFT: no schema {ms(free)}, schema seen first {ms(first)}, "
          f"same schema again {ms(cached)}")


if __name__ == "__main__":
    main()
