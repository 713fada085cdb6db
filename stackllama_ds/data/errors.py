"""``DataError``: bad input, raised by the dump readers (posts.py, archive.py) and what reads their output.

Its own module so that archive.py (``ArchiveError`` is a ``DataError``) and posts.py (which opens
archive members) each import it without importing the other back.
"""

from __future__ import annotations

import os


class DataError(Exception):
    """Bad input: the message reads ``FILE:LINE: ATTRIBUTE: what is wrong`` (`` (site S)`` when known)."""

    def __init__(self, message: str, file: str | os.PathLike[str] | None = None, line: int | None = None,
                 attribute: str | None = None, reason: str | None = None, site: str | None = None):
        where = ":".join(str(x) for x in (file, line) if x is not None)
        prefix = f"{where}: " if where else ""
        attr = f"{attribute}: " if attribute else ""
        suffix = f" (site {site})" if site else ""
        super().__init__(f"{prefix}{attr}{message}{suffix}")
        self.message = message
        self.file, self.line, self.attribute, self.reason, self.site = file, line, attribute, reason, site

    def with_site(self, site: str) -> DataError:
        """The same error, naming the site it belongs to."""
        if self.site is not None:
            return self
        return DataError(self.message, self.file, self.line, self.attribute, self.reason, site)
