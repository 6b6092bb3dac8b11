"""Log lines: one per finished generation request, and the formats every server log line is written in.

The request line (logger `llamaserve.requests`) carries numbers, never text: the prompt and the output
appear only when the server runs with --log-requests. With --log-format json every line the API process
writes (uvicorn's included) is one JSON object, for log shippers.
"""

import copy
import json
import logging
from datetime import UTC, datetime
from typing import Any

from uvicorn.config import LOGGING_CONFIG

log = logging.getLogger("llamaserve.requests")

# The fields of a request line, in order (README: Logs). Times are seconds; absent values are null.
REQUEST_FIELDS = ("id", "request_id", "trace_id", "route", "model", "status", "stream", "prompt_tokens",
                  "output_tokens", "cached_tokens", "queue_time_s", "ttft_s", "total_time_s", "finish_reasons",
                  "error")


def log_request(fields: dict[str, Any]) -> None:
    log.info("request", extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...the record's fields}, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`; values with spaces or quotes are JSON-quoted, absent
    (None) ones left out."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return text
        return text + "".join(f" {key}={_text_value(value)}" for key, value in fields.items() if value is not None)


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n'):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def logging_config(log_format: str, log_level: str) -> dict:
    """uvicorn's logging configuration with the `llamaserve` loggers added, in `log_format` (text | json)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    ours = "llamaserve.api.request_log.JsonFormatter" if log_format == "json" else "llamaserve.api.request_log.TextFormatter"
    config["formatters"]["llamaserve"] = {"()": ours}
    if log_format == "json":  # uvicorn's own lines too
        config["formatters"]["default"] = config["formatters"]["access"] = {"()": ours}
    config["handlers"]["llamaserve"] = {"formatter": "llamaserve", "class": "logging.StreamHandler",
                                        "stream": "ext://sys.stderr"}
    config["loggers"]["llamaserve"] = {"handlers": ["llamaserve"], "level": log_level.upper(), "propagate": False}
    return config
