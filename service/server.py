"""Start the HTTP server."""

from __future__ import annotations

import logging

import uvicorn

from service.api import create_app
from service.observability import configure_logging as _configure_logging
from service.settings import Settings

logger = logging.getLogger(__name__)


def configure_logging(level: str, json_format: bool = False) -> None:
    """Send log records of ``level`` and above to stderr, once per process."""
    _configure_logging(level, json_format)


def run(settings: Settings) -> None:
    """Configure logging and serve the API with uvicorn until interrupted."""
    configure_logging(settings.log_level, settings.log_json)
    logger.info(
        "Serving bundle %s with data dir %s on http://%s:%d (API key %s, mode %s)",
        settings.bundle_dir,
        settings.data_dir,
        settings.host,
        settings.port,
        "set" if settings.api_key is not None else "not set",
        settings.auth_mode,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # The root handler set above formats uvicorn's records too, and the
        # app logs one line per request itself.
        log_config=None,
        access_log=False,
    )
