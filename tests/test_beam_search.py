"""Beam search means one thing for every captioner: transformers' length-normalised beam search.

Show-Attend-Tell runs its own beam search over an LSTM; ViT-GPT2 calls transformers' ``generate``. Both must score a
finished caption by ``sum of log-probabilities / length ** length_penalty`` (length = generated tokens, EOS included),
with the same stopping rule, so that ``num_beams`` picks the same caption from the same next-word distributions.
These tests drive both searches with decoders whose next-word log-probabilities come from fixed tables.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from datamodules.tokenizer import VocabInfo, build_word_tokenizer
from modules.captioners import ShowAttendTellCaptioner, ViTGPT2Captioner, build_vit_gpt2
from modules.captioners.base import BEAM_EARLY_STOPPING, BEAM_LENGTH_PENALTY
from modules.captioning import CaptioningModule

PAD, BOS, EOS = 0, 1, 2
IMAGE_SIZE = 16


def _vocab(size: int) -> VocabInfo:
    return VocabInfo(vocab_size=size, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


class _ImageIndex(nn.Module):
    """Stands in for the CNN: the "annotation vector" of image ``b`` is the number ``b``.

    Shape:
        ``(B, 3, H, W)`` in, ``(B, 1, 1)`` out.
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.arange(pixel_values.shape[0], dtype=torch.float32).view(-1, 1, 1)


class _Identity(nn.Module):
    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _TableDecoder(nn.Module):
    """Stands in for the attention LSTM: next-word logits ``table[image, step, previous word]``.

    The LSTM state carries the image index and the step count, so a beam search that reorders its hypotheses must
    reorder them too, exactly as it must reorder a real ``(h, c)``.

    Args:
        table: Logits. Shape: ``(images, steps, V, V)``.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.attention = _Identity()

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = features[:, 0, 0]
        return torch.stack([image, torch.zeros_like(image)], dim=1), torch.zeros_like(image)[:, None]

    def step(
        self, features: torch.Tensor, projected: torch.Tensor, tokens: torch.Tensor, state: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, c = state
        image, step = h[:, 0].long(), h[:, 1].long()
        logits = self.table[image, step, tokens]
        return logits, torch.ones(tokens.shape[0], 1), (h + torch.tensor([0.0, 1.0]), c)


def _table_captioner(table: torch.Tensor) -> ShowAttendTellCaptioner:
    """A Show-Attend-Tell captioner whose next-word logits are ``table[image, step, previous word]``."""
    vocab = _vocab(table.shape[-1])
    return ShowAttendTellCaptioner(_ImageIndex(), _TableDecoder(table), vocab, IMAGE_SIZE).eval()  # type: ignore[arg-type]


def _pixels(count: int) -> torch.Tensor:
    return torch.zeros(count, 3, IMAGE_SIZE, IMAGE_SIZE)


# ------------------------------------------------------------------------------------- a hand-built case

# Words: 0 pad, 1 bos, 2 eos, 3 "a", 4 "b". After the start token: EOS 0.4, "a" 0.6; after "a": "b" 0.75;
# after "b": EOS 0.75. The caption "a b" costs more in total than the empty caption but less per word.
P_EMPTY = 0.4
P_LONG = (0.6, 0.75, 0.75)


def _hand_table() -> torch.Tensor:
    """Log-probabilities as logits (log_softmax keeps them). Shape: ``(1, 4, 5, 5)``."""
    probs = torch.full((5, 5), 1e-6)
    probs[BOS, EOS], probs[BOS, 3] = P_EMPTY, P_LONG[0]
    probs[3, 4], probs[3, EOS] = P_LONG[1], 1.0 - P_LONG[1]
    probs[4, EOS], probs[4, 3] = P_LONG[2], 1.0 - P_LONG[2]
    probs[EOS, EOS] = probs[PAD, EOS] = 1.0
    probs = probs / probs.sum(1, keepdim=True)
    return probs.log().expand(1, 4, 5, 5).clone()


def test_show_attend_tell_beam_search_is_length_normalised() -> None:
    """The unnormalised search would return the empty caption (log 0.4 > log 0.6·0.75·0.75); transformers' rule
    divides by the length (1 against 3) and returns "a b"."""
    long_sum = sum(math.log(p) for p in P_LONG)
    assert math.log(P_EMPTY) > long_sum  # the two rules disagree on this table
    assert long_sum / 3**BEAM_LENGTH_PENALTY > math.log(P_EMPTY) / 1**BEAM_LENGTH_PENALTY
    model = _table_captioner(_hand_table())
    tokens = model.generate(_pixels(1), max_new_tokens=4, num_beams=2)
    assert tokens.tolist() == [[3, 4, EOS]]
    result = model.beam_search(_pixels(1), max_new_tokens=4, num_beams=2)
    assert result.sequences.tolist() == [[3, 4, EOS]]
    assert result.lengths.tolist() == [3]
    # transformers' sequences_scores: summed log-probabilities over the generated tokens / length ** length_penalty.
    expected = sum(float(_hand_table()[0, 0, prev, word]) for prev, word in [(BOS, 3), (3, 4), (4, EOS)]) / 3.0
    assert result.scores.tolist() == pytest.approx([expected], abs=1e-6)
    # Greedy takes "a" (0.6 > 0.4) too, so here one beam finds the same caption.
    assert model.generate(_pixels(1), max_new_tokens=4, num_beams=1).tolist() == [[3, 4, EOS]]


def test_length_penalty_zero_is_the_unnormalised_search() -> None:
    """With ``length_penalty=0`` the score is the summed log-probability, and the empty caption wins."""
    result = _table_captioner(_hand_table()).beam_search(_pixels(1), max_new_tokens=4, num_beams=2, length_penalty=0.0)
    assert result.sequences.tolist() == [[EOS]]
    assert result.scores.tolist() == pytest.approx([math.log(P_EMPTY)], abs=1e-5)


def test_caption_cut_at_max_new_tokens_counts_its_full_length() -> None:
    """A hypothesis that reaches ``max_new_tokens`` without EOS is finished there, with length ``max_new_tokens``."""
    table = _hand_table()
    table[0, :, 4] = torch.tensor([1e-6, 1e-6, 1e-6, 1.0, 1e-6]).log()  # after "b" always "a": never ends
    table[0, :, 3] = torch.tensor([1e-6, 1e-6, 1e-6, 1e-6, 1.0]).log()  # after "a" always "b"
    result = _table_captioner(table).beam_search(_pixels(1), max_new_tokens=4, num_beams=2)
    assert result.sequences.tolist() == [[3, 4, 3, 4]]
    assert result.lengths.tolist() == [4]
    total = float(table[0, 0].log_softmax(-1)[BOS, 3] + 3 * table[0, 0].log_softmax(-1)[3, 4])
    assert result.scores.tolist() == pytest.approx([total / 4], abs=1e-5)


# ------------------------------------------------------------------ agreement with transformers' generate


class _TableLM(PreTrainedModel, GenerationMixin):
    """A causal LM for transformers' ``generate`` whose next-word logits are ``table[step, previous word]``.

    The prompt is the start token, so the step is ``input_ids.shape[1] - 1``, as in the captioners' decoders.
    """

    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, table: torch.Tensor) -> None:
        super().__init__(config)
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))  # generate() reads the device from the parameters

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> CausalLMOutput:
        steps = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return CausalLMOutput(logits=self.table[steps, input_ids])


def _transformers_beam_search(
    table: torch.Tensor, max_new_tokens: int, num_beams: int, length_penalty: float, early_stopping: bool
) -> list[list[int]]:
    """transformers' beam search on each image's table, with the arguments ``ViTGPT2Captioner.generate`` passes."""
    vocab_size = table.shape[-1]
    config = PretrainedConfig(vocab_size=vocab_size, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    rows = []
    for image_table in table:
        model = _TableLM(config, image_table).eval()
        out = model.generate(
            input_ids=torch.tensor([[BOS]]),
            attention_mask=torch.ones(1, 1, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=EOS,
            pad_token_id=PAD,
            use_cache=False,
        )[0, 1:].tolist()
        # transformers pads after EOS; the captioners' outputs end at the longest caption of the batch.
        rows.append(out[: out.index(EOS) + 1] if EOS in out else out)
    return rows


def _strip(tokens: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else [t for t in row if t != PAD])
    return rows


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"),
    [(BEAM_LENGTH_PENALTY, BEAM_EARLY_STOPPING), (0.0, False), (2.0, False), (1.0, True)],
)
@pytest.mark.parametrize("num_beams", [2, 3, 5])
def test_show_attend_tell_agrees_with_transformers_beam_search(
    num_beams: int, length_penalty: float, early_stopping: bool
) -> None:
    """Same next-word log-probabilities, same captions: 12 images, tables where EOS is likely at every step."""
    images, steps, vocab_size = 12, 7, 7
    generator = torch.Generator().manual_seed(num_beams)
    table = 2.0 * torch.randn(images, steps, vocab_size, vocab_size, generator=generator)
    table[..., EOS] += 1.0  # many hypotheses end early and compete with longer ones
    table[..., [PAD, BOS]] = -1e4  # never produced, so pad marks the end of a caption cut at max_new_tokens
    expected = _transformers_beam_search(table, steps, num_beams, length_penalty, early_stopping)
    result = _table_captioner(table).beam_search(
        _pixels(images), steps, num_beams, length_penalty=length_penalty, early_stopping=early_stopping
    )
    assert _strip(result.sequences) == expected
    # Not a vacuous agreement: captions of several lengths, some cut at max_new_tokens.
    assert len({len(row) for row in expected}) >= 2


def test_vit_gpt2_generate_passes_the_shared_beam_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pretrained checkpoint's generation_config (e.g. ``length_penalty=2``) must not change what num_beams means."""
    torch.manual_seed(0)
    captioner = build_vit_gpt2(_vocab(20), IMAGE_SIZE, overrides={"encoder": {"patch_size": 8}}).eval()
    captioner.model.generation_config.length_penalty = 2.0
    captioner.model.generation_config.early_stopping = True
    seen: dict[str, object] = {}
    original = captioner.model.generate

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.generate(_pixels(2), max_new_tokens=3, num_beams=2)
    assert seen["length_penalty"] == BEAM_LENGTH_PENALTY
    assert seen["early_stopping"] == BEAM_EARLY_STOPPING


# ---------------------------------------------------------------- both captioners rank beams the same way


def _table_vit_gpt2(table: torch.Tensor) -> ViTGPT2Captioner:
    """A real ViT-GPT2 captioner whose next-word log-probabilities are ``table[previous word]`` at every step.

    GPT-2 without blocks computes ``lm_head(ln_f(wte[word] + wpe[position]))``: with ``wpe = 0``, ``wte`` one-hot in
    ``V + 1`` dimensions (so the normalised rows stay linearly independent) and an untied ``lm_head`` solved for the
    table, its logits are the table's rows (up to float error).

    Args:
        table: Log-probabilities. Shape: ``(V, V)``.
    """
    size = table.shape[0]
    decoder = {"n_layer": 0, "n_embd": size + 1, "n_head": 1, "tie_word_embeddings": False}
    captioner = build_vit_gpt2(_vocab(size), IMAGE_SIZE, overrides={"encoder": {"patch_size": 8}, "decoder": decoder})
    gpt2 = captioner.model.decoder
    with torch.no_grad():
        one_hot = torch.cat([torch.eye(size), torch.zeros(size, 1)], dim=1)
        gpt2.transformer.wte.weight.copy_(one_hot)
        gpt2.transformer.wpe.weight.zero_()
        normalised = gpt2.transformer.ln_f(one_hot)
        gpt2.lm_head.weight.copy_((torch.linalg.pinv(normalised) @ table).T)
    return captioner.eval()


def _step_independent_tables() -> list[torch.Tensor]:
    """The hand-built table and random ones where EOS is likely. Shape of each: ``(V, V)`` log-probabilities."""
    tables = [_hand_table()[0, 0]]
    generator = torch.Generator().manual_seed(7)
    for _ in range(6):
        logits = 2.0 * torch.randn(7, 7, generator=generator)
        logits[:, EOS] += 1.0
        logits[:, [PAD, BOS]] = -1e4
        tables.append(logits.log_softmax(dim=-1))
    return tables


@pytest.mark.parametrize("length_penalty", [BEAM_LENGTH_PENALTY, 0.0, 2.0])
def test_both_captioners_rank_beams_the_same_way(length_penalty: float) -> None:
    """ViT-GPT2 (transformers' generate) and Show-Attend-Tell (robucap's search) given the same next-word
    distributions return the same caption for every length_penalty, including the hand-built case where the
    normalised and the unnormalised rules disagree."""
    captions = []
    for table in _step_independent_tables():
        vit_gpt2 = _table_vit_gpt2(table)
        show_attend_tell = _table_captioner(table.expand(1, 6, *table.shape).clone())
        kwargs = {"max_new_tokens": 6, "num_beams": 3, "length_penalty": length_penalty}
        expected = _strip(show_attend_tell.generate(_pixels(1), **kwargs))
        assert _strip(vit_gpt2.generate(_pixels(1), **kwargs)) == expected
        captions.append(expected[0])
    hand = captions[0]
    # Summed log-probabilities pick the empty caption, the per-token mean "a b", a stronger penalty a longer one.
    assert hand == {0.0: [EOS], 1.0: [3, 4, EOS], 2.0: [3, 4, 3, 4, EOS]}[length_penalty]
    assert len({len(c) for c in captions}) >= 2  # not a vacuous agreement


def test_module_length_penalty_reaches_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.length_penalty`` is what ``CaptioningModule.caption`` passes to every captioner's beam search."""
    tokenizer = build_word_tokenizer(["a b", "b a"])
    module = CaptioningModule.with_tokenizer(tokenizer, image_size=IMAGE_SIZE, num_beams=2, length_penalty=0.5)
    seen: dict[str, object] = {}

    def spy(pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.update(kwargs)
        return torch.full((pixel_values.shape[0], 1), EOS)

    monkeypatch.setattr(module.captioner, "generate", spy)
    module.caption(_pixels(1))
    assert seen["length_penalty"] == 0.5 and seen["num_beams"] == 2
