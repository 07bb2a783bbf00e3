"""Short text for messages: the first line of an error, cut to a length a log line or terminal can hold."""
from __future__ import annotations


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The error message's first line (its type's name when empty), cut to ``limit`` characters with ``...``.

    HTTP and database errors repeat URLs and connection state over several lines; the first says what failed.
    """
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
