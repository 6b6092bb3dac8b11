"""`llamaserve bench`: a load generator for any OpenAI-compatible server (llamaserve, vLLM, llama.cpp, TGI).

prompts.py holds the shipped prompt set, load.py sends the requests (a fixed concurrency, or Poisson arrivals
at a request rate) and records each one, summary.py turns the records into throughput and latency
percentiles, plot.py draws one or more result files. The CLI (llamaserve.cli) ties them together. Needs the
`bench` extra (httpx, matplotlib); it never imports torch.
"""
