"""structlog setup: JSON lines for journald and log shippers, a readable console on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

from .config import LogConfig


def setup(config: LogConfig) -> None:
    pretty = config.format == "console" or (config.format == "auto" and sys.stdout.isatty())
    level = getattr(logging, config.level.upper())
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if pretty:
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        # A reload may change the level: a cached logger would keep the old one for good. Module loggers
        # therefore read the configuration at each call (they log rarely); the per-delivery logger of a
        # dispatcher is bound once and bound again after a reload (Dispatcher.refresh_logger).
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp, asyncio) log through the standard library: keep their warnings, on stderr.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
