"""How every llamaserve process writes its log lines: `text` for people, `json` (one object per line) for
log shippers. The API process configures uvicorn's loggers with these formatters
(llamaserve.api.request_log); the engine and tensor-parallel worker processes call `configure_process`,
and the workers inherit the format their engine was started with.
"""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
_process_format = "text"  # what configure_process set up in this process


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...the record's fields}, one object per line."""

    def __init__(self, process: str | None = None):
        super().__init__()
        self.process = process  # "engine", "tp1", ...: which process wrote the line

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                **({"process": self.process} if self.process else {}), **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time [process] LEVEL logger: message key=value ...`; values with spaces or quotes are JSON-quoted,
    absent (None) ones left out."""

    def __init__(self, process: str | None = None):
        super().__init__(f"%(asctime)s {process + ' ' if process else ''}%(levelname)s %(name)s: %(message)s")

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


def formatter(log_format: str, process: str | None = None) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    return JsonFormatter(process) if log_format == "json" else TextFormatter(process)


def configure_process(process: str, log_format: str, level: int = logging.INFO) -> None:
    """Root logging of a spawned engine or worker process: stderr, in `log_format`, lines tagged `process`."""
    global _process_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, process))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    _process_format = log_format


def process_format() -> str:
    """The format this process logs in, for the processes it starts."""
    return _process_format
