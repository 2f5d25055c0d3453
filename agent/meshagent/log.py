"""Logging as text or JSON lines; every record can carry pod/conn/reason."""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("pod", "conn", "orig_dst", "node", "peer", "identity", "reason", "detail")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(
            f"{key}={getattr(record, key)}"
            for key in FIELDS
            if getattr(record, key, None) is not None
        )
        line = f"{stamp} {record.levelname.lower():5} {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(log_format: str = "text", level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("meshagent")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get() -> logging.Logger:
    return logging.getLogger("meshagent")
