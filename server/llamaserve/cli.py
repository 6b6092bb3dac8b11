"""`llamaserve serve` (the OpenAI-compatible server), `llamaserve plan` (a deployment's memory plan),
`llamaserve bench` (a load generator for any OpenAI-compatible server) and `llamaserve playground` (a chat web
app for a server). `llamaserve COMMAND --help` documents every flag."""

import argparse
import logging
import os
import sys
from dataclasses import replace

from llamaserve.config import ATTENTION_BACKENDS, INT4_GROUP_SIZES, LM_HEAD_QUANTIZATIONS, QUANTIZATIONS


def add_serve_parser(subcommands) -> None:
    p = subcommands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a Llama-family model over an OpenAI-compatible HTTP API. Flags override the "
        "--config YAML file, which overrides the defaults.",
    )
    p.add_argument("--model", help="checkpoint directory (config.json + safetensors) or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--config", help="deployment YAML (configs/*.yaml): option: value per line")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight and KV dtype (default float32)")
    p.add_argument("--device", help="torch device for weights and KV cache (default cpu; e.g. cuda)")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   help="paged attention kernels (default auto: FlashInfer, else Triton on CUDA; torch elsewhere)")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="on CUDA: run decode steps eagerly, without CUDA graphs (less startup time and memory)")
    p.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false", default=None,
                   help="on CPU: run everything on torch's kernels (oneDNN, torch's int8/int4 kernels, the torch "
                   "attention backend, LoRA's one-hot matmuls), not on llamaserve's own AVX-512 kernels (built with "
                   "the system's C compiler on first use)")
    p.add_argument("--quantization", choices=QUANTIZATIONS,
                   help="weight-only quantization of the decoder layers' linear weights at load: int8 per output "
                   "channel, int4 in groups; auto: a .gguf file's Q4_0/Q4_1/Q8_0 tensors at their own precision "
                   "(default none: a .gguf is de-quantized to float)")
    p.add_argument("--lm-head-quantization", choices=LM_HEAD_QUANTIZATIONS,
                   help="the LM head (the output projection): int8 or int4 as above, or none: --dtype (default auto: "
                   "int8 with --quantization auto when the .gguf stores it quantized, as llama.cpp serves it; else "
                   "none). A tied embedding keeps --dtype either way")
    p.add_argument("--quantization-group-size", type=int, choices=INT4_GROUP_SIZES,
                   help="int4: input features sharing a scale and minimum (default 32)")
    p.add_argument("--max-model-len", type=int, help="prompt + output tokens per request (default 2048)")
    p.add_argument("--max-num-seqs", type=int, help="requests in one engine step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens in one engine step; longer prompts are prefilled in chunks (default 512)")
    p.add_argument("--kv-cache-gib", type=float, help="KV cache size on CPU in GiB, per tensor-parallel rank (default 1)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="on GPU: fraction of device memory for weights, activations and KV cache (default 0.9)")
    p.add_argument("--block-size", type=int, help="tokens per KV cache block (default 16)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help="do not reuse the KV of shared prompt prefixes")
    p.add_argument("--policy", choices=["fcfs", "priority"], help="admission order (default fcfs)")
    p.add_argument("--merge-lora", help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) "
                   "folded into the weights at load, as merge_and_unload does; the result is served as the model")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="PEFT LoRA adapter folders served beside the base model, each request choosing one by its "
                   "`model` field")
    p.add_argument("--enable-lora", action="store_true", default=None,
                   help="adapter slots even with no --lora-modules, for POST /v1/load_lora_adapter")
    p.add_argument("--max-loras", type=int, help="adapters resident at once, the most one engine step mixes (default 4)")
    p.add_argument("--max-lora-rank", type=int, help="the largest adapter rank served (default 16)")
    p.add_argument("--chat-template", help="built-in template name (llama-2) or a .jinja file "
                   "(default: the checkpoint's own)")
    p.add_argument("--max-concurrent-requests", type=int,
                   help="generations (one per choice) running or queued at once; more are refused with 429 and "
                   "Retry-After, so a load balancer can send them elsewhere (default 256)")
    p.add_argument("--max-request-body-bytes", type=int,
                   help="largest request body; a larger one is refused with 413 (default 16 MiB: 16777216)")
    p.add_argument("--max-prompts-per-request", type=int, help="prompts in one completions request (default 64)")
    p.add_argument("--max-n", type=int, help="choices (`n`) per prompt (default 128)")
    p.add_argument("--max-stop-strings", type=int, help="stop strings in one request (default 16)")
    p.add_argument("--max-stop-string-length", type=int, help="characters in one stop string (default 1000)")
    p.add_argument("--max-logit-bias", type=int, help="entries in one request's logit_bias (default 1024)")
    p.add_argument("--max-messages", type=int, help="messages in one chat request (default 1024)")
    p.add_argument("--tensor-parallel-size", "--tp", type=int,
                   help="split every layer across this many ranks, one process (and GPU) each (default 1)")
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"),
                   help="rendezvous address of rank 0 (default: $MASTER_ADDR, else 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=os.environ.get("MASTER_PORT"),
                   help="rendezvous port (default: $MASTER_PORT, else a free port; needed with --nnodes > 1)")
    p.add_argument("--nnodes", type=int,
                   help="hosts the tensor-parallel ranks are spread over, tp/nnodes consecutive ranks on each; every "
                   "host runs this same command with its own --node-rank (default 1)")
    p.add_argument("--node-rank", type=int,
                   help="this host's index among the nodes: 0 serves the API and holds rank 0; 1..nnodes-1 are "
                   "headless and only run their ranks, from their own copy of --model (default 0)")
    p.add_argument("--headless", action="store_true",
                   help="run no API and no engine, only this node's ranks (vLLM's flag; --node-rank >= 1 implies it)")
    p.add_argument("--gloo-socket-ifname", default=os.environ.get("GLOO_SOCKET_IFNAME"),
                   help="network interface the ranks' gloo connections use (default: $GLOO_SOCKET_IFNAME, else the "
                   "one holding this host's address toward --master-addr)")
    p.add_argument("--distributed-timeout", type=float,
                   help="seconds a tensor-parallel collective may wait before the engine gives up on a rank (default 600)")
    p.add_argument("--request-timeout", type=float,
                   help="seconds a chat or completions request may take, queueing included, before it is stopped "
                   "with a 408 (default: no limit; a client may set a shorter one with the x-request-timeout header)")
    p.add_argument("--engine-stall-timeout", type=float,
                   help="seconds the engine may hold work without finishing a step before /health says 503 and its "
                   "requests fail (default 120)")
    p.add_argument("--drain-grace", type=float,
                   help="after SIGTERM (or Ctrl+C), seconds /ready says 503 while new requests are still served, so a "
                   "load balancer moves traffic away first (default 5)")
    p.add_argument("--drain-timeout", type=float,
                   help="then, seconds in-flight requests (streams included) have to finish while new ones get 503; "
                   "what is left ends with an error (default 30). A second signal ends the drain at once")
    p.add_argument("--sse-ping-interval", type=float,
                   help="seconds between keep-alive comment lines on an open stream, so proxies never see it idle "
                   "(default 15; 0: none)")
    p.add_argument("--sse-send-timeout", type=float,
                   help="seconds a write to a stream may wait on a client that stopped reading before the stream is "
                   "aborted and its slot freed (default 30)")
    p.add_argument("--keep-alive-timeout", type=float,
                   help="seconds an idle client connection stays open between requests; keep it above your load "
                   "balancer's idle timeout (default 75)")
    p.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on the API (repeatable; also $LLAMASERVE_API_KEY)")
    p.add_argument("--api-key-file", help="a file of accepted API keys, one a line")
    p.add_argument("--protect-metrics", action="store_true", default=None,
                   help="/metrics requires an API key too (/health and /ready stay open)")
    p.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="browser origins allowed by CORS, or '*' (default: CORS off)")
    p.add_argument("--inject-fault", help=argparse.SUPPRESS)  # tests only: see llamaserve.config.FaultConfig
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="server log lines as text, or one JSON object per line (default text)")
    p.add_argument("--log-requests", action="store_true", default=None,
                   help="put each request's prompt and output text in its log line (default: numbers only)")
    p.add_argument("--otlp-traces-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None,
                   help="send a trace span per request to this OTLP/HTTP URL, e.g. http://localhost:4318/v1/traces "
                   "(default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else tracing is off)")


def config_options(args: argparse.Namespace) -> dict:
    """The configuration options that parsed `serve` flags give (None: unset), the environment's API key
    among them."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "config", "headless")}
    if os.environ.get("LLAMASERVE_API_KEY"):
        options["api_keys"] = [*(options["api_keys"] or ()), os.environ["LLAMASERVE_API_KEY"]]
    return options


def serve(args: argparse.Namespace) -> int:
    from llamaserve.config import load_config

    try:
        engine_config, server_config = load_config(args.config, **config_options(args))
    except (ValueError, TypeError, OSError) as e:
        print(f"llamaserve: {e}", file=sys.stderr)
        return 2
    if engine_config.parallel.node_rank > 0:
        from llamaserve.engine.workers import run_node

        return run_node(engine_config, server_config.log_format)
    if args.headless:
        print("llamaserve: --headless needs --node-rank >= 1: node 0 serves the API and holds rank 0", file=sys.stderr)
        return 2
    # People get a loading progress bar and a banner; log shippers (json) get only log lines.
    for_people = server_config.log_format == "text"
    engine_config = replace(engine_config, model=replace(engine_config.model, show_progress=for_people))
    import uvicorn

    from llamaserve.api.app import create_app
    from llamaserve.api.drain import CUT_WAIT, DrainingServer
    from llamaserve.api.request_log import logging_config

    url = f"http://{server_config.host}:{server_config.port}"

    def on_ready(model_name: str) -> None:
        if not for_people:
            logging.getLogger("llamaserve.server").info("ready", extra={"fields": {"url": url, "model": model_name}})
            return
        print(
            f"\nllamaserve is ready: {url} serving {model_name!r}\n\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"What is the capital of France?\"}}]}}'\n",
            flush=True,
        )

    app = create_app(engine_config, server_config, on_ready=on_ready)
    # SIGTERM and SIGINT drain the server (llamaserve.api.drain); it exits 0, or 1 if the engine died.
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level=server_config.log_level,
                            log_config=logging_config(server_config.log_format, server_config.log_level),
                            timeout_keep_alive=server_config.keep_alive_timeout, timeout_graceful_shutdown=CUT_WAIT)
    DrainingServer(config, app.state.drain).run()
    return app.state.exit_code


def add_plan_parser(subcommands) -> None:
    p = subcommands.add_parser(
        "plan",
        help="print each tensor-parallel rank's weight and KV cache memory",
        description="Print, per tensor-parallel rank, the weight bytes, the KV bytes per token and how many "
        "KV tokens and full-length sequences fit, computed from the --config YAML's architecture "
        "(formulas: llamaserve.plan). Exits 1 when the weights do not fit.",
    )
    p.add_argument("--config", required=True, help="deployment YAML with an `architecture:` section")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU in GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default 0.9)")
    p.add_argument("--tensor-parallel-size", type=int, help="ranks (default: the YAML's tensor_parallel_size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the YAML's dtype")
    p.add_argument("--max-model-len", type=int, help="tokens of one sequence (default: the YAML's max_model_len)")
    for flag, what in (("--quantization", "the decoder's linear projections"),
                       ("--lm-head-quantization", "the LM head")):
        p.add_argument(flag, choices=["none", "int8", "int4"],
                       help=f"weight-only quantization of {what} (default: the YAML's; auto counts as none)")


def plan(args: argparse.Namespace) -> int:
    from llamaserve.plan import format_plan, plan_deployment

    try:
        rank_plan = plan_deployment(
            args.config,
            gpu_memory_gib=args.gpu_memory_gib,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
            lm_head_quantization=args.lm_head_quantization,
        )
    except (ValueError, KeyError, OSError) as e:
        print(f"llamaserve: {e}", file=sys.stderr)
        return 2
    print(format_plan(rank_plan, args.gpu_memory_gib))
    return 0 if rank_plan.fits else 1


def _numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError("the values must be positive")
    return values


def add_bench_parser(subcommands) -> None:
    p = subcommands.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server: throughput and latency percentiles, JSON and PNG",
        description="Send the shipped prompt set (real prose, ShareGPT-like input and output lengths) to any "
        "OpenAI-compatible server (llamaserve, vLLM, llama.cpp, TGI) as streamed requests, at fixed concurrencies "
        "or Poisson request rates, and report throughput and TTFT, ITL, TPOT and end-to-end percentiles. "
        "With --results instead of --url, only plot result files written before.",
    )
    p.add_argument("--url", help="the server's base URL (the OpenAI routes under URL/v1), e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="the model to ask for (default: the first one /v1/models lists)")
    p.add_argument("--api-key", default=os.environ.get("LLAMASERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="sent as `Authorization: Bearer KEY` (default: $LLAMASERVE_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions with the prompt as one user message, or /v1/completions (default chat)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--concurrency", type=_numbers, metavar="N[,N...]",
                       help="requests kept in flight, one sweep point per value (default 1,4,16)")
    sweep.add_argument("--request-rate", type=_numbers, metavar="R[,R...]",
                       help="requests per second arriving as a Poisson process, one point per value ('inf': all at once)")
    p.add_argument("--max-concurrency", type=int, help="with --request-rate: at most this many in flight")
    p.add_argument("--requests", type=int, default=32,
                   help="requests per sweep point, none sent twice in a sweep while the set lasts (default 32)")
    p.add_argument("--seed", type=int, default=0, help="which requests are drawn, and the arrival times (default 0)")
    p.add_argument("--max-input-tokens", type=int, help="leave out prompts longer than this")
    p.add_argument("--max-output-tokens", type=int, help="cap each request's output length at this")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (by default requests run to their full output length)")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    p.add_argument("--warmup", type=int, default=1, help="short requests sent before the sweep, not counted (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument("--label", help="this run's name in plots (default: MODEL at URL)")
    p.add_argument("--output", help="write the result (settings, per-point summary, per-request records) as JSON here")
    p.add_argument("--plot", help="draw throughput and latency percentiles into this PNG file")
    p.add_argument("--results", nargs="+", metavar="RESULT.json",
                   help="instead of running: plot these result files on one figure (needs --plot)")
    p.add_argument("--title", help="the plot's title")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def bench(args: argparse.Namespace) -> int:
    import json

    from llamaserve.bench.plot import plot_results

    if (args.url is None) == (args.results is None):
        print("llamaserve bench: give --url (run a benchmark) or --results (plot result files)", file=sys.stderr)
        return 2
    if args.results is not None:
        if args.plot is None:
            print("llamaserve bench: --results needs --plot FILE.png", file=sys.stderr)
            return 2
        plot_results([json.loads(open(path).read()) for path in args.results], args.plot, args.title)
        print(f"wrote {args.plot}")
        return 0

    import httpx

    from llamaserve.bench.load import Target, point_line, run_sweep, served_model
    from llamaserve.bench.prompts import load_prompts, sample_prompts

    try:
        model = args.model or served_model(args.url, args.api_key)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        print(f"llamaserve bench: cannot list the models of {args.url}: {e}", file=sys.stderr)
        return 1
    kind, values = ("request_rate", args.request_rate) if args.request_rate else ("concurrency", args.concurrency or [1, 4, 16])
    # One draw for the whole sweep: no request repeats across points (while the set lasts), so a prefix cache
    # gains no more at a later point than real traffic would give it; the warm-up's come last.
    n = args.requests
    specs = sample_prompts(load_prompts(), n * len(values) + args.warmup, args.seed, args.max_input_tokens,
                           args.max_output_tokens)
    point_specs = [specs[i * n:(i + 1) * n] for i in range(len(values))]
    target = Target(args.url, model, args.endpoint, args.api_key, args.ignore_eos, args.temperature, args.timeout)
    result = run_sweep(target, point_specs, specs[n * len(values):], kind, values, args.seed, args.max_concurrency,
                       args.progress, args.label, report=lambda point: print(point_line(point, kind), flush=True))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1, allow_nan=False)
        print(f"wrote {args.output}")
    if args.plot:
        plot_results([result], args.plot, args.title)
        print(f"wrote {args.plot}")
    failed = sum(point["summary"]["failed"] for point in result["points"])
    if failed:
        print(f"llamaserve bench: {failed} requests failed (see the summary's errors)", file=sys.stderr)
    return 0


def add_playground_parser(subcommands) -> None:
    p = subcommands.add_parser(
        "playground",
        help="a chat web app (Gradio) for a llamaserve server",
        description="Start a Gradio chat app that talks to a llamaserve server over its OpenAI API: streamed "
        "answers, multi-turn history, a system prompt and sampling options, a stop button. Needs the "
        "`playground` extra: pip install 'llamaserve[playground]'.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("LLAMASERVE_API_KEY"),
                   help="sent as `Authorization: Bearer KEY` (default: $LLAMASERVE_API_KEY)")
    p.add_argument("--model", help="the model to chat with (default: the first one /v1/models lists)")
    p.add_argument("--host", default="127.0.0.1", help="address the app listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="the app's port (default 7860)")


def playground(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("llamaserve playground needs Gradio: pip install 'llamaserve[playground]'", file=sys.stderr)
        return 2
    import httpx

    from llamaserve.playground import serve_playground

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool makes no calls home
    try:
        serve_playground(args.url, args.api_key, args.model, args.host, args.port)
    except httpx.HTTPError as e:
        print(f"llamaserve playground: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamaserve", description="An inference server for Llama-family models.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subcommands)
    add_plan_parser(subcommands)
    add_bench_parser(subcommands)
    add_playground_parser(subcommands)
    args = parser.parse_args(argv)
    return {"serve": serve, "plan": plan, "bench": bench, "playground": playground}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
