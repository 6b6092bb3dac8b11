"""Mixed load for the balancer and soak tests: chat and completions, half of them streaming, from many
clients at once, each request's outcome classified. Nothing can hang: every request has a deadline."""

import asyncio
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.e2e.checks import read_events

WORDS = ["river", "stone", "lamp", "orbit", "violet", "copper", "harbor", "meadow", "signal", "thread"]
DEADLINE = 60.0  # seconds one request may take before it counts as hung
# For the servers under load: their engine's OpenMP threads sleep while they wait for each other. Servers,
# clients and nginx share few cores here, and threads that spin take the core their partner needs: the
# same load ran three times slower (12 requests/s instead of 40 on two busy cores).
SLEEPING_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Outcome:
    index: int
    stream: bool
    # ok; left (the client closed the stream on purpose); http_error (a status other than 200);
    # error_event (a stream that ended with an error event); cut (a stream whose connection broke, or
    # that ended without [DONE]); transport (a request that broke before any response); hung.
    kind: str
    status: int | None
    upstreams: list[str]  # the replicas nginx tried, in order (X-Upstream); [] without a balancer
    started: float
    ended: float
    detail: str = ""

    @property
    def upstream(self) -> str | None:
        """The replica that answered."""
        return self.upstreams[-1] if self.upstreams else None


def mixed_request(i: int, min_tokens: int = 1, max_tokens: int = 32, max_words: int = 80) -> tuple[str, dict]:
    """Request i of the mix: odd ones stream; chat or completions, greedy or sampled, varied lengths."""
    rng = random.Random(i)
    body = {"max_tokens": rng.randint(min_tokens, max_tokens), "ignore_eos": True, "stream": i % 2 == 1,
            "temperature": rng.choice([0.0, 0.7, 1.0])}
    if body["stream"] and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    # Chat prompts begin with the template's system prompt: prefix-cache hits.
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
    text = f"Tell me about {words}." if rng.random() < 0.5 else f"{i}: {words}"
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


def upstreams(response: httpx.Response) -> list[str]:
    header = response.headers.get("x-upstream", "")
    return [address.strip() for address in header.split(",") if address.strip()]


async def send(http: httpx.AsyncClient, index: int, path: str, body: dict, leave_after: int | None = None,
               on_stream: Callable[[int, str | None], None] | None = None) -> Outcome:
    """One request, classified. `leave_after`: a stream is closed after that many events.
    `on_stream(index, replica)` runs once a stream's response has begun, and (index, None) when it ends."""
    started = time.monotonic()
    outcome = Outcome(index, body["stream"], "transport", None, [], started, started)
    try:
        await asyncio.wait_for(_send(http, path, body, outcome, leave_after, on_stream), DEADLINE)
    except TimeoutError:
        outcome.kind, outcome.detail = "hung", f"no end after {DEADLINE} s"
    except httpx.TransportError as e:
        outcome.kind = "cut" if outcome.status is not None else "transport"
        outcome.detail = f"{type(e).__name__}: {e}"
    finally:
        if on_stream is not None and outcome.status is not None and outcome.stream:
            on_stream(index, None)
    outcome.ended = time.monotonic()
    return outcome


async def _send(http: httpx.AsyncClient, path: str, body: dict, outcome: Outcome, leave_after: int | None,
                on_stream: Callable[[int, str | None], None] | None) -> None:
    if not body["stream"]:
        response = await http.post(path, json=body)
        outcome.status, outcome.upstreams = response.status_code, upstreams(response)
        if response.status_code != 200:
            outcome.kind, outcome.detail = "http_error", response.text[:300]
        else:
            outcome.kind = "ok" if response.json()["choices"] else "http_error"
        return
    async with http.stream("POST", path, json=body) as response:
        outcome.status, outcome.upstreams = response.status_code, upstreams(response)
        if on_stream is not None:
            on_stream(outcome.index, outcome.upstream)
        if response.status_code != 200:
            outcome.kind, outcome.detail = "http_error", (await response.aread()).decode()[:300]
            return
        if leave_after is not None:
            events = 0
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
                if events >= leave_after:
                    outcome.kind = "left"
                    return  # leaving the block closes the connection mid-stream
            outcome.kind = "ok"  # it ended before we left
            return
        await response.aread()
        try:
            events = read_events(response)
        except AssertionError as e:  # a body that stopped short of [DONE], or broken framing
            outcome.kind, outcome.detail = "cut", f"framing: {e}"
            return
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        outcome.kind, outcome.detail = ("error_event", str(errors[0])) if errors else ("ok", "")


class Load:
    """`concurrency` clients sending mixed requests through `url` until `total` are sent (or stop()):
    run() in this thread, or start() in a thread of its own. `leave(i)`: after how many events request i
    closes its stream (None: it reads to the end)."""

    def __init__(self, url: str, concurrency: int, total: int | None = None, first: int = 0,
                 request: Callable[[int], tuple[str, dict]] = mixed_request,
                 leave: Callable[[int], int | None] = lambda i: None):
        self.url, self.concurrency, self.total, self.first = url, concurrency, total, first
        self.request, self.leave = request, leave
        self.results: list[Outcome] = []
        self.streams_open: dict[int, str | None] = {}  # index -> the replica under each begun stream
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> list[Outcome]:
        asyncio.run(self._main())
        return self.results

    def start(self) -> "Load":
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = DEADLINE + 30) -> list[Outcome]:
        """Asks the clients to send nothing more and waits for what is in flight."""
        self._stopping.set()
        return self.join(timeout)

    def join(self, timeout: float = DEADLINE + 30) -> list[Outcome]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not end"
        return self.results

    def counts(self) -> Counter:
        return Counter(("stream" if o.stream else "plain", o.kind) for o in self.results)

    def _on_stream(self, index: int, replica: str | None) -> None:
        if replica is None:
            self.streams_open.pop(index, None)
        else:
            self.streams_open[index] = replica

    async def _main(self) -> None:
        next_index = iter(range(self.first, self.first + self.total) if self.total else itertools.count(self.first))
        timeout = httpx.Timeout(30.0, connect=5.0)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits) as http:

            async def client() -> None:
                for i in next_index:
                    if self._stopping.is_set():
                        return
                    path, body = self.request(i)
                    self.results.append(await send(http, i, path, body, self.leave(i), self._on_stream))

            await asyncio.gather(*(client() for _ in range(self.concurrency)))

