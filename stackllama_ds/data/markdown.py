"""HTML -> Markdown for Stack Exchange bodies, through html-to-markdown's public API.

One converter in one pinned version range, checked below, so two machines prepare a dump with the
same converter (3.20.0, 3.21.0 and 3.21.2 give byte-identical output on the beer dump; 3.22's Rust
core moved to another HTML tokenizer, unverified here). A missing or out-of-range package is an
ImportError, never a silent switch to another converter.

The Rust scanner is forced onto its single-pass byte scanner ("tier1"; it hands input it cannot
scan to the DOM walker by itself). ``convert(html, options)`` rebuilds the native options on every
call, a few times slower than through the package's private native object, which we no longer
touch (`bench/data_bench.py prepare` measures prepare end to end).

Output: fenced code blocks (```), inline code in backticks, ``[text](url)`` links, ``-`` lists,
``*``/``**`` emphasis; leading and trailing whitespace stripped.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

# Keep in step with pyproject.toml and launch/constraints.txt.
REQUIRED = "html-to-markdown>=3.20,<3.22"
_MIN, _BELOW = (3, 20), (3, 22)


class ConversionFailed(Exception):
    """The converter raised or returned nothing for a body."""


def _version() -> str:
    """The installed html-to-markdown version; ImportError when it is missing or out of range."""
    try:
        import html_to_markdown  # noqa: F401

        v = metadata.version("html-to-markdown")
    except (ImportError, metadata.PackageNotFoundError):
        raise ImportError(
            f"stackllama-ds converts Stack Exchange HTML with {REQUIRED}: pip install '{REQUIRED}'"
        ) from None
    try:
        major_minor = tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    if not _MIN <= major_minor < _BELOW:
        raise ImportError(f"html-to-markdown {v} is installed; prepared data is only reproducible with "
                          f"{REQUIRED}: pip install '{REQUIRED}'")
    return v


def _converter(tier: str) -> Callable[[str], str | None]:
    import html_to_markdown

    opts = html_to_markdown.ConversionOptions(extract_metadata=False, tier_strategy=tier, code_block_style="backticks")

    def run(html: str) -> str | None:
        return html_to_markdown.convert(html, opts).content

    return run


_CONVERTER: tuple[str, Callable[[str], str | None]] | None = None
_RETRY: Callable[[str], str | None] | None = None  # the default "auto" routing, for a second try


def _load() -> tuple[str, Callable[[str], str | None]]:
    global _CONVERTER
    if _CONVERTER is None:
        _CONVERTER = (f"html-to-markdown {_version()} tier1", _converter("tier1"))
    return _CONVERTER


def converter_name() -> str:
    """Which converter (and version) ``html_to_markdown`` uses in this process; recorded in report.json."""
    return _load()[0]


def html_to_markdown(html: str) -> str:
    """Markdown for one HTML body; raises ConversionFailed when the converter fails on it."""
    name, convert = _load()
    if not html:
        return ""
    try:
        md = convert(html)
    except Exception as e:  # the Rust side has its own error types (and panics)
        md = _retry(name, html, e)
    if md is None:
        md = _retry(name, html, None)
    return md.strip()


def _retry(name: str, html: str, first: Exception | None) -> str:
    """One more try with the default tier routing before giving up on a body."""
    global _RETRY
    err = f"{type(first).__name__}: {first}" if first is not None else "converter returned no content"
    if not name.startswith("html-to-markdown"):  # a stand-in converter (tests): nothing to retry with
        raise ConversionFailed(err)
    try:
        if _RETRY is None:
            _RETRY = _converter("auto")
        md = _RETRY(html)
    except Exception as e:  # same as above
        raise ConversionFailed(f"{err}; default options: {type(e).__name__}: {e}") from None
    if md is None:
        raise ConversionFailed(err)
    return md
