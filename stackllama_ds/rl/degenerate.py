"""Detect degenerate responses (reward hacking by repetition) for logging during PPO.

Two signals, both pure Python:
1. One substring covers most of the text, e.g. a response that is mostly "```" fences or newlines:
       share(s) = count(s) * len(s) / len(text)          (non-overlapping occurrences)
   flagged when share(s) > substr_share for one of `substrings`.
2. One n-gram of words (or token ids) repeats enough to cover most of the response:
       share(g) = |positions covered by the occurrences of g| / number of words
   flagged when an n-gram occurring at least twice has share(g) > repeat_share.

Default thresholds (substr_share = 0.5, ngram = 4, repeat_share = 0.5): ordinary answers rarely
repeat a 4-word phrase at all, and newlines or fences make up a few percent of a normal answer;
a response that is more than half one repeated phrase or one symbol is what a policy exploiting
the reward model produces (StackLLaMA's "```" runs).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEGENERATE_SUBSTRINGS", "degenerate_fraction", "is_degenerate", "repeated_ngram_share"]

DEGENERATE_SUBSTRINGS: tuple[str, ...] = ("```", "`", "\n", "*", "#", "-", "=", "_", ".", "!", "?", "~")


def repeated_ngram_share(words: Sequence[str] | Sequence[int], ngram: int = 4) -> float:
    """Largest share of `words` covered by the occurrences of one n-gram that occurs at least twice.

    Formula: max_g |union_{i: words[i:i+n] == g} [i, i+n)| / len(words)   over g with >= 2 occurrences

    Args:
        words: words of a text, or token ids.
        ngram: n, the n-gram length.

    Returns:
        A share in [0, 1]; 0.0 when there are fewer than n + 1 words or no repeated n-gram.
    """
    n_words = len(words)
    if ngram <= 0 or n_words <= ngram:
        return 0.0
    starts: dict[tuple, list[int]] = {}
    for i in range(n_words - ngram + 1):
        starts.setdefault(tuple(words[i : i + ngram]), []).append(i)
    best = 0
    for positions in starts.values():
        if len(positions) < 2:
            continue
        # Occurrences may overlap ("a a a a a"); count each covered word once.
        covered = sum(min(ngram, nxt - cur) for cur, nxt in zip(positions, positions[1:])) + ngram
        best = max(best, covered)
    return best / n_words


def is_degenerate(
    text: str | Sequence[int],
    substr_share: float = 0.5,
    ngram: int = 4,
    repeat_share: float = 0.5,
    substrings: Sequence[str] = DEGENERATE_SUBSTRINGS,
) -> bool:
    """Whether a response is degenerate: mostly one substring, or mostly one repeated n-gram.

    Formula: any_s count(s) * len(s) / len(text) > substr_share   or   repeated_ngram_share > repeat_share

    Args:
        text: the decoded response, or its token ids (then only the n-gram test applies).
        substr_share: threshold for the share of characters covered by one of `substrings`.
        ngram: n-gram length in words (whitespace split) or tokens.
        repeat_share: threshold for the share of words covered by one repeated n-gram.
        substrings: the substrings to test, e.g. "```" and "\\n".

    Returns:
        True when either share exceeds its threshold. An empty response is not flagged
        (count empty responses separately).
    """
    if isinstance(text, str):
        if not text:
            return False
        for s in substrings:
            if s and text.count(s) * len(s) / len(text) > substr_share:  # count * len(s) / len(text)
                return True
        words: Sequence[str] | Sequence[int] = text.split()
    else:
        words = list(text)
    return repeated_ngram_share(words, ngram) > repeat_share


def degenerate_fraction(texts: Sequence[str] | Sequence[Sequence[int]], **kwargs) -> float:
    """Share of `texts` (strings or token-id lists) flagged by `is_degenerate`; 0.0 for none.

    Formula: sum_i [is_degenerate(text_i)] / len(texts)

    Keyword arguments are passed on to `is_degenerate`.
    """
    if not texts:
        return 0.0
    return sum(is_degenerate(t, **kwargs) for t in texts) / len(texts)
