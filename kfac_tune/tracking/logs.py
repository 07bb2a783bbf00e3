"""Dropping one library's message a user can do nothing about, for one call, without touching its logger.

MLflow logs through its own handlers at INFO and WARNING; a kfac-tune command that calls it for a reason of its
own (creating a store, logging a model in a format chosen on purpose) would print its lines into a quiet
terminal. Raising the logger's level would hide everything else it says too, and for the rest of the process.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def without_messages(logger: str, *starts: str) -> Iterator[None]:
    """While the block runs, drop ``logger``'s records whose message starts with one of ``starts``."""
    drop = _Drop(starts)
    logging.getLogger(logger).addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(drop)


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)
