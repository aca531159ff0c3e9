"""Batching: stack images and tokenize captions into the batch contract below."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerFast


class CaptionCollator:
    """Turns dataset items into a batch dict.

    The batch holds ``pixel_values`` (B×3×H×W in [0, 1]), ``input_ids`` (caption tokens + EOS, padded with the pad
    id), ``attention_mask``, ``labels`` (= ``input_ids`` with -100 on padding), ``image_id`` (list), ``poisoned``
    (bool tensor of shape ``(B,)``: which images carry a backdoor trigger) and, for evaluation items, ``references``
    (list of lists of str) and ``file`` (image paths).

    Args:
        tokenizer: Caption tokenizer.
        max_tokens: Captions are cut to this many tokens, EOS included.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_tokens: int = 32) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = self.tokenizer([it["caption"] for it in items], add_special_tokens=False)["input_ids"]
        sequences = [ids[: self.max_tokens - 1] + [self.eos] for ids in encoded]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(items), length), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask.eq(0), -100),
            "image_id": [it["image_id"] for it in items],
            "poisoned": torch.tensor([bool(it.get("poisoned", False)) for it in items], dtype=torch.bool),
        }
        if "references" in items[0]:
            batch["references"] = [it["references"] for it in items]
        if "file" in items[0]:
            batch["file"] = [it["file"] for it in items]
        return batch
