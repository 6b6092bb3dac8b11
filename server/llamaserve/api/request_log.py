"""Log lines: one per finished generation request, and the formats every server log line is written in.

The request line (logger `llamaserve.requests`) carries numbers, never text: the prompt and the output
appear only when the server runs with --log-requests. With --log-format json every line the server
writes (uvicorn's, the engine's and the workers' included) is one JSON object, for log shippers; the
formatters live in llamaserve.logs.
"""

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG

log = logging.getLogger("llamaserve.requests")

# The fields of a request line, in order (README: Logs). Times are seconds; absent values are null.
REQUEST_FIELDS = ("id", "request_id", "trace_id", "route", "model", "status", "stream", "prompt_tokens",
                  "output_tokens", "cached_tokens", "queue_time_s", "ttft_s", "total_time_s", "finish_reasons",
                  "error")


def log_request(fields: dict[str, Any]) -> None:
    log.info("request", extra={"fields": fields})


def logging_config(log_format: str, log_level: str) -> dict:
    """uvicorn's logging configuration with the `llamaserve` loggers added, in `log_format` (text | json)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    ours = "llamaserve.logs.JsonFormatter" if log_format == "json" else "llamaserve.logs.TextFormatter"
    config["formatters"]["llamaserve"] = {"()": ours}
    if log_format == "json":  # uvicorn's own lines too
        config["formatters"]["default"] = config["formatters"]["access"] = {"()": ours}
    config["handlers"]["llamaserve"] = {"formatter": "llamaserve", "class": "logging.StreamHandler",
                                        "stream": "ext://sys.stderr"}
    config["loggers"]["llamaserve"] = {"handlers": ["llamaserve"], "level": log_level.upper(), "propagate": False}
    return config
