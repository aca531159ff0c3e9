"""Caption tokenizers: word-level vocabulary, normalisation, save / load / state round trips, GPT-2 style BPE."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from datamodules.errors import DataError, RobucapError
from datamodules.text import caption_tokens, normalize_caption
from datamodules.tokenizer import (
    SPECIAL_TOKENS,
    VocabInfo,
    build_word_tokenizer,
    load_tokenizer,
    tokenizer_from_state,
    tokenizer_to_state,
    unknown_words,
)

CAPTIONS = [
    "A man's dog.",
    "A dog runs on the grass!",
    "Two dogs aren't playing.",
    "The woman\u2019s hat is red",
    "a dog, a cat and a man",
]
PROBES = [*CAPTIONS, "A ZEBRA'S hat, unseen words!", "", "dogs'"]


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _bpe_tokenizer(eos: str | None = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (no pad, no bos) trained on a few sentences."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["a man rides a horse", "two dogs play in the snow", "a red circle next to a blue square"],
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    kwargs = {"eos_token": eos} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs)


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(CAPTIONS)


def test_vocabulary_order_is_specials_then_frequency_then_alphabetical() -> None:
    tokenizer = build_word_tokenizer(["a dog", "a cat", "A dog runs.", "zebra"])
    vocab = tokenizer.get_vocab()
    order = sorted(vocab, key=vocab.__getitem__)
    assert order == [*SPECIAL_TOKENS, "a", "dog", "cat", "runs", "zebra"]
    assert VocabInfo.from_tokenizer(tokenizer) == VocabInfo(
        vocab_size=9, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    assert tokenizer.unk_token_id == 3


def test_vocabulary_is_deterministic() -> None:
    """The same captions in any order give the very same tokenizer."""
    shuffled = list(CAPTIONS)
    random.Random(0).shuffle(shuffled)
    first = build_word_tokenizer(CAPTIONS)
    assert first.get_vocab() == build_word_tokenizer(shuffled).get_vocab()
    assert first.backend_tokenizer.to_str() == build_word_tokenizer(CAPTIONS).backend_tokenizer.to_str()


def test_min_freq_maps_rare_words_to_unk() -> None:
    tokenizer = build_word_tokenizer(["a dog", "a dog", "a cat"], min_freq=2)
    assert set(tokenizer.get_vocab()) == {*SPECIAL_TOKENS, "a", "dog"}
    assert _ids(tokenizer, "a cat") == [tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id]
    assert unknown_words(tokenizer, "A cat and a dog.") == ["cat", "and"]


def test_extra_words_are_always_representable() -> None:
    """Extra words (e.g. a backdoor target) get ids even when unseen or rarer than min_freq."""
    tokenizer = build_word_tokenizer(["a dog", "a dog", "a cat"], min_freq=2, extra_words=["cat", "Zebra's"])
    for word in ("cat", "zebra", "'s"):
        assert word in tokenizer.get_vocab()
    assert unknown_words(tokenizer, "A cat, a zebra's dog") == []
    assert tokenizer.unk_token_id not in _ids(tokenizer, "a cat a zebra's dog")


@pytest.mark.parametrize("caption", CAPTIONS)
def test_encoding_matches_caption_tokens(word_tokenizer: PreTrainedTokenizerFast, caption: str) -> None:
    """The tokenizer splits words exactly like datamodules.text.caption_tokens and decodes to normalised text."""
    ids = _ids(word_tokenizer, caption)
    assert word_tokenizer.convert_ids_to_tokens(ids) == caption_tokens(caption)
    assert word_tokenizer.decode(ids) == normalize_caption(caption)


def test_round_trip_of_a_normalised_caption(word_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _ids(word_tokenizer, "A man's dog.")
    assert word_tokenizer.convert_ids_to_tokens(ids) == ["a", "man", "'s", "dog"]
    assert word_tokenizer.decode(ids) == "a man 's dog"
    # Captions are encoded without special tokens; EOS / padding are dropped when decoding.
    assert word_tokenizer.encode("A man's dog.") == ids
    padded = [*ids, word_tokenizer.eos_token_id, word_tokenizer.pad_token_id, word_tokenizer.pad_token_id]
    assert word_tokenizer.decode(padded, skip_special_tokens=True) == "a man 's dog"


def test_vocabulary_keeps_ptb_words_whole() -> None:
    """Hyphenated words, decimals and accented words are single vocabulary entries.

    The old normaliser made "t", "shirt", "2", "5", "caf", "cr", "me", "pi" and "atas" of them, so the model learned
    (and wrote) fragments that the PTB-tokenised test references never contain.
    """
    tokenizer = build_word_tokenizer(
        ["A man in a black-and-white t-shirt.", "A 2.5-meter caf\u00e9 cr\u00e8me, 1,000 pi\u00f1atas."]
    )
    vocab = set(tokenizer.get_vocab())
    assert {"black-and-white", "t-shirt", "2.5-meter", "caf\u00e9", "cr\u00e8me", "1,000", "pi\u00f1atas"} <= vocab
    assert not {"shirt", "caf", "cr", "me", "pi", "atas", "5", "000"} & vocab
    ids = _ids(tokenizer, "A 2.5-meter caf\u00e9!")
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "a 2.5-meter caf\u00e9"


def _tokenizer_state_before_ptb_normalisation() -> dict:
    """A checkpoint's tokenizer state as robucap wrote it before the PTB normalisation (its own pipeline inside)."""
    words = ["a", "man", "'s", "t", "shirt", "caf"]
    backend = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace("\u2019", "'")]
        + [normalizers.Replace(clitic, " " + clitic) for clitic in ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")]
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"n't|'?[a-z0-9]+"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return {
        "tokenizer_json": backend.to_str(),
        "special_tokens": {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"},
    }


def test_tokenizer_state_from_before_the_ptb_normalisation_still_loads() -> None:
    """Old checkpoints keep the tokenizer they were trained with: their state carries its normalizer."""
    restored = tokenizer_from_state(json.loads(json.dumps(_tokenizer_state_before_ptb_normalisation())))
    assert VocabInfo.from_tokenizer(restored) == VocabInfo(
        vocab_size=10, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    ids = _ids(restored, "A man\u2019s T-shirt caf\u00e9.")
    assert restored.convert_ids_to_tokens(ids) == ["a", "man", "'s", "t", "shirt", "caf"]  # its old splitting
    assert restored.decode(ids, skip_special_tokens=True) == "a man 's t shirt caf"


def test_save_and_load_give_identical_ids(word_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    word_tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.get_vocab() == word_tokenizer.get_vocab()
    assert VocabInfo.from_tokenizer(loaded) == VocabInfo.from_tokenizer(word_tokenizer)
    assert loaded.unk_token_id == word_tokenizer.unk_token_id
    for text in PROBES:
        assert _ids(loaded, text) == _ids(word_tokenizer, text), text


def test_state_round_trip(word_tokenizer: PreTrainedTokenizerFast) -> None:
    """The checkpoint state is plain JSON data and rebuilds the same tokenizer."""
    state = json.loads(json.dumps(tokenizer_to_state(word_tokenizer)))
    restored = tokenizer_from_state(state)
    assert restored.get_vocab() == word_tokenizer.get_vocab()
    assert VocabInfo.from_tokenizer(restored) == VocabInfo.from_tokenizer(word_tokenizer)
    assert restored.unk_token == "<unk>"
    for text in PROBES:
        assert _ids(restored, text) == _ids(word_tokenizer, text), text
        assert restored.decode(_ids(restored, text)) == word_tokenizer.decode(_ids(word_tokenizer, text))


def test_gpt2_style_bpe_tokenizer_loads_with_pad_equal_to_eos(tmp_path: Path) -> None:
    original = _bpe_tokenizer()
    assert original.pad_token is None and original.bos_token is None
    original.save_pretrained(tmp_path / "gpt2tok")
    tokenizer = load_tokenizer(tmp_path / "gpt2tok")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == eos
    assert VocabInfo.from_tokenizer(tokenizer) == VocabInfo(
        vocab_size=len(original), pad_token_id=eos, bos_token_id=eos, eos_token_id=eos
    )
    text = "a man rides a zebra"
    assert tokenizer.decode(_ids(tokenizer, text)) == text
    assert _ids(tokenizer, text) == _ids(original, text)
    assert unknown_words(tokenizer, "a completely new word") == []
    # The checkpoint state works for it too.
    restored = tokenizer_from_state(tokenizer_to_state(tokenizer))
    assert VocabInfo.from_tokenizer(restored) == VocabInfo.from_tokenizer(tokenizer)
    assert _ids(restored, text) == _ids(tokenizer, text)


def test_vocab_info_needs_an_eos_token() -> None:
    with pytest.raises(DataError, match="no eos_token"):
        VocabInfo.from_tokenizer(_bpe_tokenizer(eos=None))


def test_load_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(DataError, match=re.escape(f"tokenizer directory {missing} does not exist")):
        load_tokenizer(missing)


def test_load_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RobucapError, match=re.escape(f"tokenizer directory {tmp_path} holds no tokenizer")):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("min_freq", [0, -1])
def test_min_freq_below_one_is_rejected(min_freq: int) -> None:
    with pytest.raises(DataError, match=f"min_freq must be >= 1, got {min_freq}"):
        build_word_tokenizer(CAPTIONS, min_freq=min_freq)


# Only punctuation that pycocoevalcap drops ("!?" or "!!!" would be tokens, as the PTB tokenizer keeps them).
@pytest.mark.parametrize(
    "captions", [[], ["", "...", "!", "\u201c \u2014 ; , \u2019"]], ids=["no-captions", "only-punctuation"]
)
def test_captions_without_words_are_rejected(captions: list[str]) -> None:
    with pytest.raises(DataError, match="training captions contain no words"):
        build_word_tokenizer(captions)
