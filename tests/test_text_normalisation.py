"""Caption normalisation: caption_tokens against pycocoevalcap's PTB tokenizer, and the word tokenizer against it."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from datamodules.text import CAPTION_NORMALISATION, caption_tokens, normalize_caption
from datamodules.tokenizer import build_word_tokenizer, unknown_words
from modules.metrics import java_available, ptb_tokenize

needs_java = pytest.mark.skipif(not java_available(), reason="Java is needed to run the PTB tokenizer")

FIXTURE = Path(__file__).parent / "fixtures" / "tricky_captions.json"


@cache
def _tricky_captions() -> tuple[str, ...]:
    """Real-world captions with hyphens, numbers, clitics, accents, emoji, CJK, quotes, brackets, odd spacing..."""
    return tuple(json.loads(FIXTURE.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def ptb_tokens() -> list[list[str]]:
    """What pycocoevalcap's test metrics make of each fixture caption (PTB tokenizer, then punctuation filter)."""
    captions = list(_tricky_captions())
    # One Java run for all. The lexer peeks at the character after a caption, which is a newline for every caption
    # but the last of a batch; a final filler line gives every fixture caption that newline.
    lines = ptb_tokenize([*captions, "filler"])[: len(captions)]
    return [line.split(" ") if line else [] for line in lines]


def test_fixture_covers_the_tricky_cases() -> None:
    captions = _tricky_captions()
    assert len(captions) >= 30
    text = "\n".join(captions)
    lower = text.lower()
    for needle in ("t-shirt", "2.5-meter", "1,000", "3.5", "10am", "1st", "$5", "man's", "don't", "dogs'", "o'clock"):
        assert needle in lower, needle
    for needle in ("\u2019", "caf\u00e9", "pi\u00f1ata", "na\u00efve", "Z\u00fcrich", "\U0001f436", "\u4e00\u53ea"):
        assert needle in text, needle
    for needle in ('"', "(", "[", "and/or", "...", "\t", "   "):
        assert needle in text, needle
    assert "" in captions and "...!!!" in captions and any(c.isupper() for c in captions)


@needs_java
def test_caption_tokens_equal_the_ptb_tokenizer(ptb_tokens: list[list[str]]) -> None:
    """Caption_tokens gives pycocoevalcap's PTB tokens for every tricky real-world caption.

    Hyphenated words and decimals stay whole, accented letters and CJK are kept, clitics split, emoji vanish.
    """
    mismatches = [
        (caption, ours, theirs)
        for caption, theirs in zip(_tricky_captions(), ptb_tokens, strict=True)
        if (ours := caption_tokens(caption)) != theirs
    ]
    assert mismatches == []


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A man in a black-and-white T-shirt.", ["a", "man", "in", "a", "black-and-white", "t-shirt"]),
        ("A 2.5-meter pole, 1,000 birds", ["a", "2.5-meter", "pole", "1,000", "birds"]),
        ("Caf\u00e9 cr\u00e8me in a pi\u00f1ata", ["caf\u00e9", "cr\u00e8me", "in", "a", "pi\u00f1ata"]),
        ("The man\u2019s dog can't.", ["the", "man", "'s", "dog", "ca", "n't"]),
        ("A dog (brown) \U0001f436 says...!!!", ["a", "dog", "-lrb-", "brown", "-rrb-", "says", "!!!"]),
        ("a 2 1/2 year old", ["a", "2\u00a01/2", "year", "old"]),
    ],
)
def test_caption_tokens_keep_ptb_words(caption: str, tokens: list[str]) -> None:
    """The old normaliser split "t-shirt", "2.5" and "1,000" and cut "café" to "caf"."""
    assert caption_tokens(caption) == tokens
    assert normalize_caption(caption) == " ".join(tokens)


@needs_java
def test_word_tokenizer_gives_the_ptb_tokens(ptb_tokens: list[list[str]]) -> None:
    """A word tokenizer built from the captions tokenises them into pycocoevalcap's PTB tokens.

    Encoding then decoding gives the PTB tokens back, so what the model learns to write is what the test scores.
    """
    captions = _tricky_captions()
    tokenizer = build_word_tokenizer(captions)
    for caption, tokens in zip(captions, ptb_tokens, strict=True):
        assert tokenizer.tokenize(caption) == tokens, caption
        decoded = tokenizer.decode(tokenizer.encode(caption, add_special_tokens=False))
        assert (decoded.split(" ") if decoded else []) == tokens, caption


def test_word_tokenizer_gives_caption_tokens(tmp_path: Path) -> None:
    """The built word tokenizer splits raw text exactly like caption_tokens, saved or not.

    A saved tokenizer is used by transformers without robucap (an exported model), so the same splitting must be in
    its tokenizer.json; decoding gives normalize_caption's text back.
    """
    captions = _tricky_captions()
    tokenizer = build_word_tokenizer(captions)
    tokenizer.save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    for caption in captions:
        expected = caption_tokens(caption)
        ids = tokenizer.encode(caption, add_special_tokens=False)
        assert tokenizer.tokenize(caption) == expected, caption
        assert tokenizer.convert_ids_to_tokens(ids) == expected, caption
        assert tokenizer.unk_token_id not in ids, caption
        assert tokenizer.decode(ids) == normalize_caption(caption), caption
        assert plain.tokenize(caption) == expected, caption
        assert unknown_words(tokenizer, caption) == [], caption


def _characters() -> list[str]:
    """Every character of the blocks captions draw on (Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, Thai,
    punctuation, symbols, CJK punctuation and kana, full-width forms), a sample of the rest of the BMP, and a few
    characters beyond it."""
    blocks = [(0x20, 0x2FF), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1E00, 0x1FFF)]
    blocks += [(0x2000, 0x2BFF), (0x3000, 0x30FF), (0xFF00, 0xFFEF)]
    codes = {code for low, high in blocks for code in range(low, high + 1)}
    codes |= set(range(0x80, 0x10000, 97)) | {0x1F436, 0x1F600, 0x1D400, 0x20000, 0x10FFFD}
    return [chr(code) for code in sorted(codes) if not 0xD800 <= code <= 0xDFFF]


def test_python_and_tokenizers_run_the_normalisation_alike() -> None:
    """Python's regex and tokenizers' Oniguruma read every pattern alike, character by character.

    Each character is tried alone, inside a word, between words, after an upper-case compound and between digits,
    so every rewrite and token rule meets it; the tokenizer must produce caption_tokens' tokens for all of them.
    """
    texts = list(_tricky_captions())
    for char in _characters():
        texts += [f"q{char}z", f"Q {char}'s", f"AT&T{char}{char.upper()}", f"2{char}5 1/2"]
    tokenizer = build_word_tokenizer(texts)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    mismatches = [
        (text, ours, encoding.tokens)
        for text, encoding in zip(texts, encodings, strict=True)
        if (ours := caption_tokens(text)) != encoding.tokens
    ]
    assert mismatches == []


def test_normalisation_patterns_are_portable() -> None:
    """The shared patterns avoid syntax that tokenizers cannot run: group references and \\s/\\w/\\d classes."""
    steps = [*CAPTION_NORMALISATION.cased_rewrites, *CAPTION_NORMALISATION.rewrites]
    patterns = [step.pattern for step in steps]
    for pattern in [*patterns, CAPTION_NORMALISATION.token_pattern, CAPTION_NORMALISATION.punctuation_pattern]:
        for escape in ("\\s", "\\w", "\\d", "\\b"):
            assert escape not in pattern.replace("\\\\", ""), (escape, pattern[:80])
    assert all("\\" not in step.replacement for step in steps)
