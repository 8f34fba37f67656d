"""Start the HTTP server."""

from __future__ import annotations

import logging

import uvicorn

from service.api import create_app
from service.settings import Settings

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Send log records of ``level`` and above to stderr, once per process."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def run(settings: Settings) -> None:
    """Configure logging and serve the API with uvicorn until interrupted."""
    configure_logging(settings.log_level)
    logger.info(
        "Serving bundle %s with data dir %s on http://%s:%d",
        settings.bundle_dir,
        settings.data_dir,
        settings.host,
        settings.port,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # The root handler set above formats uvicorn's records too.
        log_config=None,
    )
