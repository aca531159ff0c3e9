"""Caption normalisation shared by tokenisation, metrics and exact-match tests (ASR).

Captions are lower-cased, split PTB-style (clitics such as ``'s`` and ``n't`` become their own tokens)
and stripped of punctuation, matching what pycocoevalcap's PTB tokenizer feeds its scorers.
"""

from __future__ import annotations

import re

# PTB splits clitics off the word they follow; pycocoevalcap then keeps them as tokens.
_CLITICS = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m|n't)\b")
_TOKEN = re.compile(r"n't|'?[a-z0-9]+")


def caption_tokens(text: str) -> list[str]:
    """Split a caption into normalised tokens.

    Args:
        text: Raw caption.

    Returns:
        Lower-case tokens with punctuation removed, e.g. ``"A man's dog."`` -> ``["a", "man", "'s", "dog"]``.
    """
    text = text.lower().replace("\u2019", "'")
    text = _CLITICS.sub(r" \1", text)
    return _TOKEN.findall(text)


def normalize_caption(text: str) -> str:
    """Return the caption as normalised tokens joined by single spaces (see :func:`caption_tokens`)."""
    return " ".join(caption_tokens(text))
