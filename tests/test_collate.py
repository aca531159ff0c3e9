"""CaptionCollator: the batch contract (shapes, EOS, padding, labels, truncation, references)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.tokenizer import build_word_tokenizer

CAPTIONS = ["A man's dog.", "a red circle on the left of a blue square", "Dogs!"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(CAPTIONS)


def _items(captions: list[str], references: bool = False, size: int = 8) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i, caption in enumerate(captions):
        item: dict[str, Any] = {
            "pixel_values": torch.full((3, size, size), i / 10),
            "caption": caption,
            "image_id": f"img{i}" if i % 2 else i,
        }
        if references:
            item["references"] = [caption, f"another caption {i}"]
        items.append(item)
    return items


def _words(tokenizer: PreTrainedTokenizerFast, caption: str) -> list[int]:
    return tokenizer.encode(caption, add_special_tokens=False)


def test_batch_shapes_and_keys(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = CaptionCollator(tokenizer)(_items(CAPTIONS))
    longest = len(_words(tokenizer, CAPTIONS[1])) + 1
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "image_id", "poisoned"}
    # Items without the flag (clean data from elsewhere) count as clean.
    assert batch["poisoned"].tolist() == [False, False, False]
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert torch.equal(batch["pixel_values"][2], torch.full((3, 8, 8), 0.2))
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (3, longest), key
        assert batch[key].dtype == torch.long, key
    assert batch["image_id"] == [0, "img1", 2]


def test_eos_appended_padding_and_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = CaptionCollator(tokenizer)(_items(CAPTIONS))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    length = batch["input_ids"].shape[1]
    for row, caption in enumerate(CAPTIONS):
        expected = [*_words(tokenizer, caption), eos]
        n = len(expected)
        assert batch["input_ids"][row].tolist() == expected + [pad] * (length - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        assert batch["labels"][row].tolist() == expected + [-100] * (length - n)
    assert torch.equal(batch["labels"].ne(-100), batch["attention_mask"].bool())


def test_truncation_keeps_eos_last(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = CaptionCollator(tokenizer, max_tokens=4)(_items(CAPTIONS))
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].shape == (3, 4)
    long_words = _words(tokenizer, CAPTIONS[1])
    assert batch["input_ids"][1].tolist() == [*long_words[:3], eos]
    assert batch["labels"][1].tolist() == [*long_words[:3], eos]
    # Captions shorter than max_tokens are untouched.
    assert batch["labels"][2].tolist() == [*_words(tokenizer, "Dogs!"), eos, -100, -100]
    single = CaptionCollator(tokenizer, max_tokens=1)(_items(CAPTIONS))
    assert single["input_ids"].tolist() == [[eos]] * 3


def test_empty_caption_is_just_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = CaptionCollator(tokenizer)(_items(["", "Dogs!"]))
    assert batch["labels"][0].tolist() == [tokenizer.eos_token_id, -100]


def test_references_are_passed_through(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = CaptionCollator(tokenizer)(_items(CAPTIONS[:2], references=True))
    assert batch["references"] == [[CAPTIONS[0], "another caption 0"], [CAPTIONS[1], "another caption 1"]]
    assert "references" not in CaptionCollator(tokenizer)(_items(CAPTIONS[:2]))


def test_pad_equal_to_eos_keeps_the_real_eos_in_labels() -> None:
    """With a GPT-2 style tokenizer (pad = EOS) only the padding, not the caption's EOS, is masked out."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CAPTIONS, vocab_size=280, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert tokenizer.pad_token_id is None
    batch = CaptionCollator(tokenizer)(_items(["Dogs!", "a red circle"]))
    eos = tokenizer.eos_token_id
    short = [*_words(tokenizer, "Dogs!"), eos]
    length = batch["input_ids"].shape[1]
    assert length > len(short)
    assert batch["input_ids"][0].tolist() == short + [eos] * (length - len(short))
    assert batch["labels"][0].tolist() == short + [-100] * (length - len(short))
    assert batch["labels"][1].tolist()[-1] == eos
