"""Caption tokenizers: a word-level vocabulary built from training captions, or one loaded from disk.

Both are ``transformers.PreTrainedTokenizerFast`` objects, so they save with ``save_pretrained`` and ship
inside exported models. Captions are encoded *without* special tokens; the collator appends EOS and the
decoder starts from BOS (``decoder_start_token_id``).

The word-level tokenizer splits text with :data:`datamodules.text.CAPTION_NORMALISATION` built into its
``tokenizers`` normalizer and pre-tokenizer, so it yields exactly the tokens of :func:`datamodules.text.caption_tokens`
(the PTB tokens pycocoevalcap scores), also where it is used by ``transformers`` without robucap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from datamodules.errors import DataError
from datamodules.text import CAPTION_NORMALISATION, CaptionNormalisation, caption_tokens

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class VocabInfo:
    """What a captioner needs to know about its tokenizer.

    Attributes:
        vocab_size: Number of token ids (``len(tokenizer)``).
        pad_token_id: Padding id.
        bos_token_id: Decoder start id.
        eos_token_id: End-of-caption id.
    """

    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast) -> VocabInfo:
        """Read the ids from a tokenizer (GPT-2 style tokenizers without a pad token use EOS as pad)."""
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if eos is None:
            raise DataError("the tokenizer has no eos_token; set one (for example '<|endoftext|>' for GPT-2)")
        return cls(vocab_size=len(tokenizer), pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)


def build_word_tokenizer(
    captions: Iterable[str], min_freq: int = 1, extra_words: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer from training captions.

    Words are the normalised tokens of :func:`datamodules.text.caption_tokens`; words seen fewer than
    ``min_freq`` times map to ``<unk>``. The vocabulary order is deterministic (frequency, then alphabetical).

    Args:
        captions: Training captions (raw text).
        min_freq: Minimum number of occurrences for a word to get its own id.
        extra_words: Words that must be representable whatever their frequency (for example a backdoor target).

    Returns:
        A fast tokenizer with ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>`` special tokens.
    """
    if min_freq < 1:
        raise DataError(f"tokenizer min_freq must be >= 1, got {min_freq}")
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(caption_tokens(caption))
    for word in extra_words:
        for token in caption_tokens(word):
            counts[token] = max(counts[token], min_freq)
    words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
    if not words:
        raise DataError("cannot build a tokenizer: the training captions contain no words")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    _split_like_caption_tokens(backend, CAPTION_NORMALISATION)
    # No decoder: tokenizers then joins tokens with single spaces, which gives normalize_caption's text back.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _split_like_caption_tokens(backend: Tokenizer, normalisation: CaptionNormalisation) -> None:
    """Give ``backend`` the normalizer and pre-tokenizer that run ``normalisation`` as :func:`caption_tokens` does."""
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(step.pattern), step.replacement) for step in normalisation.cased_rewrites]
        + [normalizers.Lowercase()]
        + [normalizers.Replace(Regex(step.pattern), step.replacement) for step in normalisation.rewrites]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Keep the matches of the token pattern, drop the text between them...
            pre_tokenizers.Split(Regex(normalisation.token_pattern), behavior="removed", invert=True),
            # ...then remove punctuation tokens whole (a piece left empty is discarded).
            pre_tokenizers.Split(Regex(f"^(?:{normalisation.punctuation_pattern})$"), behavior="removed"),
        ]
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` (ours or, e.g., GPT-2's) from a local directory.

    Raises:
        DataError: The directory is missing or holds no tokenizer.
    """
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist (expected a directory written by save_pretrained)")
    if not any((path / name).exists() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise DataError(
            f"tokenizer directory {path} holds no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the tokenizer in {path}: {err}") from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"the tokenizer in {path} is not a fast tokenizer (expected tokenizer.json)")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-2 ships without a pad token; padding positions are masked out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_to_state(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Serialise a tokenizer into plain data for a checkpoint (no pickled objects)."""
    return {
        "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
    }


def tokenizer_from_state(state: dict) -> PreTrainedTokenizerFast:
    """Inverse of :func:`tokenizer_to_state`."""
    backend = Tokenizer.from_str(state["tokenizer_json"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **state["special_tokens"]
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unknown_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """Words of ``text`` that the tokenizer maps to its unknown token (empty for byte-level BPE)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    words = caption_tokens(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if isinstance(tokenizer.backend_tokenizer.model, models.WordLevel) and len(ids) == len(words):
        # One id per word: read them in context, since some PTB tokens change when tokenised on their own (the
        # "y'" of "y'all" alone becomes "y").
        return [word for word, token_id in zip(words, ids, strict=True) if token_id == unk]
    return [w for w in words if unk in tokenizer.encode(w, add_special_tokens=False)]
