"""Synthetic captioning data and models shared by the step-time benchmarks (no dataset on disk needed).

A word tokenizer over about 50 words, deterministic captions of 5 to 15 words, pre-collated batches of uniform random
images in the batch-dict contract, and randomly initialised :class:`~modules.captioning.CaptioningModule` s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.tokenizer import build_word_tokenizer
from modules.captioning import CaptioningModule

LABEL_TOKENS = 14  # longest label row, EOS included; shorter captions are padded with -100
DISTINCT_BATCHES = 4  # the loops cycle through this many different batches

# ~50 words: captions of 5 to 15 words, so labels are 6 to 14 tokens long with -100 padding.
_COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_THINGS = ("circle", "square", "triangle", "star", "dog", "cat", "car", "ball", "tree", "house", "bird", "boat")
_PLACES = ("left", "right", "top", "bottom", "middle", "corner", "edge")
_VERBS = ("sits", "lies", "stands", "floats", "rests")
_LINKS = ("a", "the", "on", "of", "in", "near", "next", "to", "and", "with", "small", "large", "bright", "dark")


def synthetic_captions(count: int, seed: int) -> list[str]:
    """Deterministic captions over a vocabulary of about 50 words.

    Args:
        count: Number of captions.
        seed: Seed of the word choices.

    Returns:
        Captions of 5 to 15 words.
    """
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = ["a", rng.choice(_COLORS), rng.choice(_THINGS), rng.choice(_VERBS), "on", "the", rng.choice(_PLACES)]
        extra = rng.randint(-2, 8)
        if extra < 0:
            words = words[:extra]
        else:
            words += [rng.choice(_LINKS + _COLORS + _THINGS) for _ in range(extra)]
        captions.append(" ".join(words))
    return captions


def build_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    """Word tokenizer over every word the synthetic captions can use (~50 words plus 4 special tokens)."""
    every_word = " ".join(_COLORS + _THINGS + _PLACES + _VERBS + _LINKS)
    return build_word_tokenizer([every_word, *synthetic_captions(64, seed)])


def build_batches(
    tokenizer: PreTrainedTokenizerFast, batch_size: int, image_size: int, seed: int, device: torch.device
) -> list[dict[str, Any]]:
    """Pre-collated synthetic batches in the batch-dict contract (``pixel_values``, ``input_ids``, ...).

    Args:
        tokenizer: Caption tokenizer.
        batch_size: Images per batch.
        image_size: Image side in pixels.
        seed: Seed of images and captions.
        device: Where the tensors are placed (identically for both loops).

    Returns:
        :data:`DISTINCT_BATCHES` batches with ``pixel_values`` uniform in [0, 1] and labels of up to
        :data:`LABEL_TOKENS` tokens, -100 on padding.
    """
    collate = CaptionCollator(tokenizer, max_tokens=LABEL_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    captions = synthetic_captions(DISTINCT_BATCHES * batch_size, seed + 1)
    batches = []
    for b in range(DISTINCT_BATCHES):
        items = [
            {
                "pixel_values": torch.rand(3, image_size, image_size, generator=generator),
                "caption": captions[b * batch_size + i],
                "image_id": f"synthetic-{b}-{i}",
            }
            for i in range(batch_size)
        ]
        batch = collate(items)
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return batches


class PrebuiltBatches(Dataset):
    """Serves pre-collated batches (use with ``DataLoader(batch_size=None)``), cycling through them.

    Args:
        batches: Batch dicts.
        length: Number of items (training steps) to serve.
    """

    def __init__(self, batches: Sequence[dict[str, Any]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


def build_module(tokenizer: PreTrainedTokenizerFast, preset: str, image_size: int, seed: int) -> CaptioningModule:
    """A randomly initialised module, the same for a given seed."""
    torch.manual_seed(seed)
    return CaptioningModule.with_tokenizer(
        tokenizer, captioner={"class_path": "vit_gpt2", "init_args": {"preset": preset}}, image_size=image_size
    )
