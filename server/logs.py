"""Log output: plain text for a terminal, or one JSON object per line for log pipelines
(`--log-format json`). Request lines carry their fields (see runtime/telemetry.RequestLog), and
every line logged while a request is served carries its id (REQUEST_ID, set by the front end
that took the request)."""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime

from loraplex.server.config import LogConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The id of the request being served: the client's x-request-id, or one made up.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get(None)  # logged while serving a call: which one
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(config: LogConfig) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())


def shown_ids(ids: list[str], limit: int = 20) -> str:
    """Request ids for a log line: the first `limit`, then how many more."""
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more
