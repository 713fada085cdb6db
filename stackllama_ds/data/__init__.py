"""Stack Exchange data: Posts.xml streaming, HTML->Markdown, scoring, pairing, splits, template.

    python -c "from stackllama_ds.data.prepare import prepare; prepare('data/beer.stackexchange.com/Posts.xml', 'runs/data')"

Light on purpose: importing ``stackllama_ds.data`` loads nothing; import the submodule you need
(``template`` is stdlib only, ``posts``/``markdown`` need lxml and html-to-markdown, ``prepare``
needs datasets).
"""
