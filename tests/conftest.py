"""Shared test settings: offline, single-threaded torch (tiny models run faster that way)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_logging_handlers():
    """Entry points called in-process (``main([...])``) may attach log handlers to the test's
    captured stderr; a later test would then log into a closed stream. Put every logger's
    handlers back as they were after each test."""
    import logging

    def snapshot():
        known = logging.Logger.manager.loggerDict.values()
        loggers = [logging.getLogger()] + [lg for lg in known if isinstance(lg, logging.Logger)]
        return {lg: list(lg.handlers) for lg in loggers}

    before = snapshot()
    yield
    for logger in snapshot():
        logger.handlers[:] = before.get(logger, [])
