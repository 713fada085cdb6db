"""The HTML -> Markdown converter on hand-written bodies, and its fallback."""

from __future__ import annotations

import pytest

from stackllama_ds.data import markdown


def test_stack_exchange_constructs():
    html = (
        '<p>Use <code>x[0]</code>, see <a href="https://e.com/a">the docs</a>, <em>really</em> '
        "<strong>now</strong>.</p>\n<ul>\n<li>one</li>\n<li>two</li>\n</ul>\n"
        '<pre class="lang-py prettyprint-override"><code>def f():\n    return 1 &lt; 2\n</code></pre>\n'
        "<p>a &amp; b</p>"
    )
    md = markdown.html_to_markdown(html)
    assert "`x[0]`" in md and "[the docs](https://e.com/a)" in md
    assert "*really*" in md and "**now**" in md
    assert "- one\n- two" in md
    assert "```" in md and "def f():\n    return 1 < 2\n```" in md
    assert md.endswith("a & b") and md == md.strip()
    assert markdown.html_to_markdown("") == ""


def test_second_try_with_default_options(monkeypatch):
    markdown.converter_name()

    def broken(html):
        raise RuntimeError("scanner bailed")

    monkeypatch.setattr(markdown, "_CONVERTER", ("html-to-markdown/tier1", broken))
    assert markdown.html_to_markdown("<p>a <code>b</code></p>") == "a `b`"
    monkeypatch.setattr(markdown, "_CONVERTER", ("other", broken))
    with pytest.raises(markdown.ConversionFailed, match="scanner bailed"):
        markdown.html_to_markdown("<p>a</p>")
