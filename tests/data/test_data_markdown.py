"""The HTML -> Markdown converter on hand-written bodies, on the beer dump, its retry and its version pin."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import pytest
from lxml import etree

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


# sha256 over every Body of the embedded beer dump, converted and joined by NUL: the same with
# html-to-markdown 3.20.0, 3.21.0 and 3.21.2 (and with the private native path this replaced).
BEER_DIGEST = "5b3364c020625067977500fb22cca2956bba33ecf22c717be6f4acc4fbf6bf7c"
BEER = Path(__file__).resolve().parents[2] / "data/beer.stackexchange.com/Posts.xml"


def test_beer_dump_converts_to_the_pinned_output():
    bodies = [el.get("Body") for _, el in etree.iterparse(str(BEER), tag="row") if el.get("Body")]
    h = hashlib.sha256()
    for b in bodies:
        h.update(markdown.html_to_markdown(b).encode() + b"\0")
    assert (len(bodies), h.hexdigest()) == (2326, BEER_DIGEST)


def test_converter_name_records_the_version():
    assert markdown.converter_name() == f"html-to-markdown {metadata.version('html-to-markdown')} tier1"


@pytest.mark.parametrize("installed", [None, "3.19.4", "3.22.0", "4.0.0"])
def test_missing_or_unpinned_package_is_an_import_error(monkeypatch, installed):
    def version(name):
        if installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(markdown.metadata, "version", version)
    monkeypatch.setattr(markdown, "_CONVERTER", None)
    with pytest.raises(ImportError, match=r"html-to-markdown>=3\.20,<3\.22"):
        markdown.html_to_markdown("<p>a</p>")


def test_second_try_with_default_options(monkeypatch):
    name = markdown.converter_name()

    def broken(html):
        raise RuntimeError("scanner bailed")

    monkeypatch.setattr(markdown, "_CONVERTER", (name, broken))
    assert markdown.html_to_markdown("<p>a <code>b</code></p>") == "a `b`"
    monkeypatch.setattr(markdown, "_CONVERTER", ("other", broken))
    with pytest.raises(markdown.ConversionFailed, match="scanner bailed"):
        markdown.html_to_markdown("<p>a</p>")
