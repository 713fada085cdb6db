"""HTML -> Markdown for Stack Exchange bodies.

html-to-markdown's Rust converter, forced onto its single-pass byte scanner ("tier1"; it falls back
to the DOM walker by itself for input the scanner cannot handle). Measured on the beer dump's bodies
on one core: tier1 ~63 MB/s, the default "auto" routing ~37 MB/s, markdownify ~3 MB/s. Options are
built into the native object once: going through ``html_to_markdown.convert(html, options)`` rebuilds
them on every call and halves the speed. If the native module is missing or its API changed, we fall
back to ``html_to_markdown.convert`` and then to markdownify.

Output: fenced code blocks (```), inline code in backticks, ``[text](url)`` links, ``-`` lists,
``*``/``**`` emphasis; leading and trailing whitespace stripped.
"""

from __future__ import annotations

from collections.abc import Callable


class ConversionFailed(Exception):
    """The converter raised or returned nothing for a body."""


def _native() -> Callable[[str], str | None]:
    from html_to_markdown import ConversionOptions
    from html_to_markdown import _html_to_markdown as rust
    from html_to_markdown.api import _to_rust_conversion_options

    opts = _to_rust_conversion_options(
        ConversionOptions(extract_metadata=False, tier_strategy="tier1", code_block_style="backticks")
    )
    convert = rust.convert

    def run(html: str) -> str | None:
        return convert(html, opts).content

    return run


def _public() -> Callable[[str], str | None]:
    import html_to_markdown

    def run(html: str) -> str | None:
        res = html_to_markdown.convert(html)
        return res if isinstance(res, str) else res.content

    return run


def _markdownify() -> Callable[[str], str | None]:
    from markdownify import markdownify

    def run(html: str) -> str | None:
        return markdownify(html, heading_style="ATX", code_language="", bullets="-")

    return run


def _pick() -> tuple[str, Callable[[str], str | None]]:
    probe = "<p>a <code>b</code> <a href='u'>c</a></p><pre><code>x\n</code></pre>"
    for name, factory in (("html-to-markdown/tier1", _native), ("html-to-markdown", _public),
                          ("markdownify", _markdownify)):
        try:
            fn = factory()
            if "```" in (fn(probe) or ""):
                return name, fn
        except Exception:  # an import or API mismatch: try the next converter
            continue
    raise ImportError("no HTML->Markdown converter: install html-to-markdown (or markdownify)")


_CONVERTER: tuple[str, Callable[[str], str | None]] | None = None
_RETRY: Callable[[str], str | None] | None = None  # html-to-markdown's default routing, for a second try


def converter_name() -> str:
    """Which converter ``html_to_markdown`` uses in this process."""
    global _CONVERTER
    if _CONVERTER is None:
        _CONVERTER = _pick()
    return _CONVERTER[0]


def html_to_markdown(html: str) -> str:
    """Markdown for one HTML body; raises ConversionFailed when the converter fails on it."""
    global _CONVERTER
    if _CONVERTER is None:
        _CONVERTER = _pick()
    if not html:
        return ""
    try:
        md = _CONVERTER[1](html)
    except Exception as e:  # the Rust side has its own error types (and panics)
        md = _retry(html, e)
    if md is None:
        md = _retry(html, None)
    return md.strip()


def _retry(html: str, first: Exception | None) -> str:
    """One more try with html-to-markdown's default options before giving up on a body."""
    global _RETRY
    err = f"{type(first).__name__}: {first}" if first is not None else "converter returned no content"
    if _CONVERTER is None or _CONVERTER[0] != "html-to-markdown/tier1":
        raise ConversionFailed(err)
    try:
        if _RETRY is None:
            _RETRY = _public()
        md = _RETRY(html)
    except Exception as e:  # same as above
        raise ConversionFailed(f"{err}; default options: {type(e).__name__}: {e}") from None
    if md is None:
        raise ConversionFailed(err)
    return md
