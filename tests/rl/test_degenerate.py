"""Degenerate-response detector: substring share and repeated n-grams."""

import pytest

from stackllama_ds.rl import degenerate_fraction, is_degenerate
from stackllama_ds.rl.degenerate import repeated_ngram_share

NORMAL = (
    "You can use a list comprehension to filter the items, for example `[x for x in xs if x > 0]`.\n"
    "If the list is large, a generator expression avoids building a second list in memory."
)


def test_normal_answer_is_not_degenerate():
    assert not is_degenerate(NORMAL)
    assert not is_degenerate("")


def test_substring_spam():
    assert is_degenerate("```" * 40)
    assert is_degenerate("Sure.\n```\n```\n```\n```\n```\n```\n```\n```")
    assert is_degenerate("\n" * 30 + "ok")
    assert not is_degenerate("```python\nprint(1)\n```")
    # share = count * len / len(text): 3 fences of 3 chars in 18 chars = 0.5, not above it
    assert not is_degenerate("```" * 3 + "abcdefghi")
    assert is_degenerate("```" * 3 + "abcdefghi", substr_share=0.4)


def test_repeated_ngram():
    phrase = "I hope this helps "
    assert is_degenerate("Thanks. " + phrase * 6)
    assert repeated_ngram_share("a b c d a b c d".split(), 4) == 1.0
    assert repeated_ngram_share("a a a a a".split(), 4) == 1.0  # overlapping occurrences count once
    assert repeated_ngram_share("a b c d e f g h".split(), 4) == 0.0
    assert repeated_ngram_share("a b c d".split(), 4) == 0.0  # one occurrence is no repetition
    words = "w1 w2 w3 w4 x y z w1 w2 w3 w4 q".split()  # 8 of 12 words covered
    assert repeated_ngram_share(words, 4) == pytest.approx(8 / 12)
    assert is_degenerate(" ".join(words)) and not is_degenerate(" ".join(words), repeat_share=0.7)


def test_token_ids_and_fraction():
    assert is_degenerate([5, 6, 7, 8] * 5)
    assert not is_degenerate(list(range(20)))
    assert degenerate_fraction([NORMAL, "```" * 10, "hi", "ok " * 20]) == 0.5
    assert degenerate_fraction([]) == 0.0
