"""The captioner contract, one suite for every architecture: what training, freezing, attacks and metrics rely on.

Each captioner (the two built-ins and the toy of ``tests/helpers/toy_captioner.py``) must give teacher-forced logits
and a loss that padding does not change, input gradients in eval mode, captions padded after EOS, learn two captions
well enough to generate them greedily and with beams, split its parameters into ``encoder`` and ``decoder``, name
its weight-decay exemptions, and rebuild from its settings' dict form (what checkpoints store).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.toy_captioner import ToySettings
from torch import nn
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.tokenizer import VocabInfo, build_word_tokenizer
from modules.captioners import (
    Captioner,
    CaptionerOutput,
    CaptionerSettings,
    ShowAttendTellSettings,
    ViTGPT2Settings,
    caption_loss,
    resolve_captioner_settings,
)

IMAGE_SIZE = 32
CAPTIONS = ["a red circle on the left", "two blue squares"]


@dataclass(frozen=True)
class Case:
    """One architecture under test: its settings and how to overfit it on two captions."""

    settings: CaptionerSettings
    steps: int
    lr: float


CASES = {
    "vit_gpt2": Case(ViTGPT2Settings(preset="tiny"), steps=100, lr=2e-3),
    "show_attend_tell": Case(ShowAttendTellSettings(preset="tiny"), steps=80, lr=3e-3),
    "toy_gru": Case(ToySettings(hidden_dim=48), steps=120, lr=1e-2),
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def vocab(tokenizer: PreTrainedTokenizerFast) -> VocabInfo:
    return VocabInfo.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Two distinct images with the two captions (the second one padded)."""
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    items = [{"pixel_values": images[i], "caption": c, "image_id": i} for i, c in enumerate(CAPTIONS)]
    return CaptionCollator(tokenizer)(items)


@pytest.fixture(scope="module", params=sorted(CASES))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def captioner(arch: str, vocab: VocabInfo) -> Captioner:
    """Randomly initialised, in eval mode (tests must not train it)."""
    torch.manual_seed(0)
    return CASES[arch].settings.build(vocab, IMAGE_SIZE).eval()


@pytest.fixture(scope="module")
def overfit(arch: str, vocab: VocabInfo, batch: dict) -> Captioner:
    """Trained with Adam on the two fixed (image, caption) pairs until it generates them."""
    case = CASES[arch]
    torch.manual_seed(0)
    model = case.settings.build(vocab, IMAGE_SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=case.lr)
    model.train()
    for _ in range(case.steps):
        loss = model(batch["pixel_values"], batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def test_forward_logits_and_loss(captioner: Captioner, vocab: VocabInfo, batch: dict) -> None:
    labels = batch["labels"]
    with torch.no_grad():
        out = captioner(batch["pixel_values"], labels)
    assert isinstance(out, CaptionerOutput)
    assert out.logits.shape == (2, labels.shape[1], vocab.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    cross_entropy = caption_loss(out.logits, labels)
    if out.attention is None:
        assert torch.allclose(out.loss, cross_entropy)
    else:  # an attention regulariser may add to the cross-entropy, never subtract
        assert out.attention.shape[:2] == labels.shape
        assert out.loss >= cross_entropy - 1e-6


def test_padding_does_not_change_the_other_tokens(captioner: Captioner, batch: dict) -> None:
    """A caption scores the same alone, padded in a batch, or with extra padding."""
    pixels, labels = batch["pixel_values"], batch["labels"]
    short = labels[1:2, : int(labels[1].ne(-100).sum())]
    assert short.shape[1] < labels.shape[1]
    extra = torch.cat([labels, torch.full((2, 3), -100)], dim=1)
    with torch.no_grad():
        alone = captioner(pixels[1:2], short)
        padded = captioner(pixels, labels)
        more_padded = captioner(pixels, extra)
    n = short.shape[1]
    assert torch.allclose(padded.logits[1, :n], alone.logits[0, :n], atol=1e-5)
    assert torch.allclose(caption_loss(padded.logits, labels, "none")[1], caption_loss(alone.logits, short), atol=1e-5)
    assert torch.allclose(more_padded.loss, padded.loss, atol=1e-6)


def test_input_gradient_flows_in_eval_mode(captioner: Captioner, batch: dict) -> None:
    """Attacks differentiate the loss with respect to the [0, 1] pixels of an eval-mode model."""
    assert not captioner.training
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(captioner(pixels, batch["labels"]).loss, pixels)
    assert grad.shape == pixels.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_shape_and_padding(captioner: Captioner, vocab: VocabInfo, num_beams: int) -> None:
    pixels = torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    tokens = captioner.generate(pixels, max_new_tokens=6, num_beams=num_beams)
    assert tokens.dtype == torch.long
    assert tokens.shape[0] == 5 and 1 <= tokens.shape[1] <= 6
    assert ((tokens >= 0) & (tokens < vocab.vocab_size)).all()
    for row in tokens.tolist():
        if vocab.eos_token_id in row:
            rest = row[row.index(vocab.eos_token_id) + 1 :]
            assert rest == [vocab.pad_token_id] * len(rest), (num_beams, row)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_overfit_model_generates_its_captions(
    overfit: Captioner, tokenizer: PreTrainedTokenizerFast, vocab: VocabInfo, batch: dict, num_beams: int
) -> None:
    """Greedy and beam search return the training captions + EOS, padded with pad after EOS, no start token."""
    tokens = overfit.generate(batch["pixel_values"], max_new_tokens=12, num_beams=num_beams)
    expected = batch["labels"].masked_fill(batch["labels"].eq(-100), vocab.pad_token_id)
    assert tokens.tolist() == expected.tolist()
    assert tokenizer.batch_decode(tokens, skip_special_tokens=True) == CAPTIONS


def test_encoder_and_decoder_partition_the_parameters(captioner: Captioner) -> None:
    encoder, decoder = _param_ids(captioner.encoder), _param_ids(captioner.decoder)
    assert encoder and decoder
    assert not encoder & decoder
    assert encoder | decoder == _param_ids(captioner)


def test_no_weight_decay_names_biases_norms_and_embeddings(captioner: Captioner) -> None:
    exempt = captioner.no_weight_decay()
    params = dict(captioner.named_parameters())
    assert exempt <= set(params)
    assert {name for name, p in params.items() if p.ndim < 2} <= exempt
    embeddings = {f"{prefix}.weight" for prefix, m in captioner.named_modules() if isinstance(m, nn.Embedding)}
    assert embeddings and embeddings <= exempt
    # Plain weight matrices are decayed: the output layer of every architecture is one.
    linear = {f"{prefix}.weight" for prefix, m in captioner.named_modules() if isinstance(m, nn.Linear)}
    assert linear - exempt


def test_settings_round_trip_through_their_dict_form(arch: str, captioner: Captioner, vocab: VocabInfo) -> None:
    """Checkpoints store ``to_dict()``; the settings it resolves to build the same network."""
    settings = CASES[arch].settings
    restored = resolve_captioner_settings(settings.to_dict())
    assert restored == settings and type(restored) is type(settings)
    rebuilt = restored.build(vocab, IMAGE_SIZE)
    shapes = {name: tuple(value.shape) for name, value in captioner.state_dict().items()}
    assert {name: tuple(value.shape) for name, value in rebuilt.state_dict().items()} == shapes
