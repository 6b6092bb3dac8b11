"""The HTTP API: OpenAI-compatible routes over the engine client. Knows nothing of torch."""
