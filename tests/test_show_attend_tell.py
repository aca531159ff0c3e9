"""Show-Attend-Tell: loss with the attention regulariser, decoding, parts, encoder weights, errors, training, FGSM."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import resnet18
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo, build_word_tokenizer
from modules.attacks import FGSM
from modules.captioners import (
    SAT_PRESETS,
    AttentionLSTMDecoder,
    CaptionerOutput,
    CNNEncoder,
    ShowAttendTellCaptioner,
    ShowAttendTellSettings,
    build_captioner,
    caption_loss,
    cnn_encoder,
)
from modules.captioning import CaptioningModule
from modules.victims.captioner import CaptionObjective

IMAGE_SIZE = 32
CAPTIONS = ["a red circle on the left", "two blue squares"]
# Eight (image, caption) pairs for the CaptioningModule test; words are shared so the model must look at the image.
MANY_CAPTIONS = [
    "a red circle on the left",
    "two blue squares",
    "a green star at the top",
    "one red square on the right",
    "a blue circle in the middle",
    "two green stars",
    "a red star at the bottom",
    "one blue square on the left",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(MANY_CAPTIONS)


@pytest.fixture(scope="module")
def vocab(tokenizer: PreTrainedTokenizerFast) -> VocabInfo:
    return VocabInfo.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def captioner(vocab: VocabInfo) -> ShowAttendTellCaptioner:
    """A tiny, randomly initialised captioner in eval mode (tests must not train it)."""
    torch.manual_seed(0)
    return build_captioner("show_attend_tell", vocab, IMAGE_SIZE, preset="tiny").eval()


@pytest.fixture(scope="module")
def batch(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Two distinct images with the two captions (the second one padded)."""
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    items = [{"pixel_values": images[i], "caption": c, "image_id": i} for i, c in enumerate(CAPTIONS)]
    return CaptionCollator(tokenizer)(items)


def _train(vocab: VocabInfo, batch: dict, steps: int) -> ShowAttendTellCaptioner:
    """A tiny captioner trained for ``steps`` Adam steps on the two fixed (image, caption) pairs, in eval mode."""
    torch.manual_seed(0)
    model = build_captioner("show_attend_tell", vocab, IMAGE_SIZE, preset="tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch["pixel_values"], batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def overfit(vocab: VocabInfo, batch: dict) -> ShowAttendTellCaptioner:
    """Trained until it generates its two captions exactly."""
    return _train(vocab, batch, 80)


@pytest.fixture(scope="module")
def models(captioner: ShowAttendTellCaptioner, overfit: ShowAttendTellCaptioner, vocab: VocabInfo, batch: dict) -> dict:
    """Decoders of three kinds: random (never ends a caption), partly trained (unsure, ends early), overfit (sure)."""
    return {"random": captioner, "partly_trained": _train(vocab, batch, 15), "overfit": overfit}


def _images(count: int, seed: int = 5) -> torch.Tensor:
    """Random [0, 1] images, the same whatever ran before. Shape: ``(count, 3, IMAGE_SIZE, IMAGE_SIZE)``."""
    return torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _param_ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _labels_of(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Generated tokens as labels: everything after the first EOS becomes -100. Shape: ``(B, T)``."""
    is_eos = tokens.eq(eos).long()
    after_eos = (is_eos.cumsum(1) - is_eos).gt(0)
    return tokens.masked_fill(after_eos, -100)


def _sequence_log_prob(model: ShowAttendTellCaptioner, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of generated captions (EOS included, padding excluded). Shape: ``(B,)``."""
    labels = _labels_of(tokens, model.vocab.eos_token_id)
    with torch.no_grad():
        logits = model(pixels, labels).logits
    return -caption_loss(logits, labels, reduction="none") * labels.ne(-100).sum(1)


# --------------------------------------------------------------------------------------- forward and loss


def test_forward_shapes_and_loss_is_cross_entropy_plus_attention_penalty(
    captioner: ShowAttendTellCaptioner, vocab: VocabInfo, batch: dict
) -> None:
    labels = batch["labels"]
    with torch.no_grad():
        out = captioner(batch["pixel_values"], labels)
    assert isinstance(out, CaptionerOutput)
    steps = labels.shape[1]
    assert out.logits.shape == (2, steps, vocab.vocab_size)
    grid = captioner.encoder.grid_size
    assert grid == IMAGE_SIZE // 8
    assert out.attention.shape == (2, steps, grid * grid)
    assert torch.allclose(out.attention.sum(-1), torch.ones(2, steps))
    # The regulariser by hand: per image and grid position, (1 - attention summed over the caption's steps)^2.
    penalties = []
    for b in range(2):
        length = int(labels[b].ne(-100).sum())
        for i in range(grid * grid):
            penalties.append((1.0 - sum(float(out.attention[b, t, i]) for t in range(length))) ** 2)
    penalty = sum(penalties) / len(penalties)
    cross_entropy = caption_loss(out.logits, labels)
    assert captioner.alpha_c == 1.0
    assert penalty > 0.01  # visible in the loss, not a rounding error
    assert torch.allclose(out.loss, cross_entropy + captioner.alpha_c * penalty, atol=1e-6)


def test_alpha_c_scales_the_penalty(vocab: VocabInfo, batch: dict) -> None:
    losses = {}
    for alpha_c in (0.0, 1.0, 3.0):
        torch.manual_seed(0)
        model = build_captioner("show_attend_tell", vocab, IMAGE_SIZE, overrides={"alpha_c": alpha_c}).eval()
        with torch.no_grad():
            out = model(batch["pixel_values"], batch["labels"])
        losses[alpha_c] = out.loss
        if alpha_c == 0.0:
            assert torch.equal(out.loss, caption_loss(out.logits, batch["labels"]))
    assert torch.allclose(losses[3.0] - losses[0.0], 3 * (losses[1.0] - losses[0.0]), atol=1e-6)


def test_padding_does_not_change_the_other_rows(captioner: ShowAttendTellCaptioner, batch: dict) -> None:
    """A caption scores the same alone, padded in a batch, or with extra padding (regulariser included)."""
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
    assert torch.allclose(padded.attention[1, :n], alone.attention[0, :n], atol=1e-6)
    assert torch.allclose(caption_loss(padded.logits, labels, "none")[1], caption_loss(alone.logits, short), atol=1e-5)
    assert torch.allclose(more_padded.loss, padded.loss, atol=1e-6)
    # The first row does not see the second row's padding either.
    with torch.no_grad():
        first = captioner(pixels[:1], labels[:1])
    assert torch.allclose(padded.logits[0], first.logits[0], atol=1e-5)


def test_input_gradient_flows_in_eval_mode(captioner: ShowAttendTellCaptioner, batch: dict) -> None:
    """Attacks differentiate the loss with respect to the [0, 1] pixels of an eval-mode model."""
    assert not captioner.training
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    loss = captioner(pixels, batch["labels"]).loss
    (grad,) = torch.autograd.grad(loss, pixels)
    assert grad.shape == pixels.shape
    assert grad.is_contiguous()  # the channels-last trick inside the encoder does not leak out
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dropout_is_active_in_train_mode_only(vocab: VocabInfo, batch: dict) -> None:
    torch.manual_seed(0)
    model = build_captioner("show_attend_tell", vocab, IMAGE_SIZE, overrides={"dropout": 0.5})
    pixels, labels = batch["pixel_values"], batch["labels"]
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(pixels, labels).logits, model(pixels, labels).logits)
        model.train()
        assert not torch.equal(model(pixels, labels).logits, model(pixels, labels).logits)


# ----------------------------------------------------------------------------------------------- generate


def _stepwise_greedy(model: ShowAttendTellCaptioner, pixels: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Reference greedy decoding through teacher-forced ``forward`` on the growing prefix, one image at a time."""
    eos, pad = model.vocab.eos_token_id, model.vocab.pad_token_id
    rows = []
    for image in pixels:
        tokens: list[int] = []
        while len(tokens) < max_new_tokens and eos not in tokens:
            # The logits at position t depend on the start token and labels[:t] only: the last label is a dummy.
            labels = torch.tensor([[*tokens, pad]])
            with torch.no_grad():
                tokens.append(int(model(image[None], labels).logits[0, -1].argmax()))
        rows.append(tokens)
    longest = max(len(r) for r in rows)
    return [r + [pad] * (longest - len(r)) for r in rows]


KINDS = ["random", "partly_trained", "overfit"]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_stepwise_argmax(models: dict, batch: dict, kind: str) -> None:
    model = models[kind]
    pixels = torch.cat([batch["pixel_values"], _images(2)])
    tokens = model.generate(pixels, max_new_tokens=8)
    assert tokens.tolist() == _stepwise_greedy(model, pixels, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_with_one_beam_is_greedy(models: dict, batch: dict, kind: str) -> None:
    model = models[kind]
    pixels = torch.cat([batch["pixel_values"], _images(4)])
    greedy = model.generate(pixels, max_new_tokens=10, num_beams=1)
    beam = model.beam_search(pixels, max_new_tokens=10, num_beams=1)
    assert beam.sequences.tolist() == greedy.tolist()
    assert torch.equal(beam.lengths, _caption_lengths(greedy, model.vocab.eos_token_id))
    assert torch.allclose(beam.scores, _sequence_log_prob(model, pixels, greedy) / beam.lengths, atol=1e-5)


def _caption_lengths(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Generated tokens up to and including the first EOS (all of them if none). Shape: ``(B,)``."""
    return _labels_of(tokens, eos).ne(-100).sum(1)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_scores_at_least_greedy(models: dict, batch: dict, kind: str) -> None:
    """Beam scores are length-normalised log-probabilities (transformers' rule, length_penalty 1), and on these
    images never below greedy's."""
    model = models[kind]
    pixels = torch.cat([batch["pixel_values"], _images(6)])
    greedy_tokens = model.generate(pixels, max_new_tokens=10)
    eos = model.vocab.eos_token_id
    greedy = _sequence_log_prob(model, pixels, greedy_tokens) / _caption_lengths(greedy_tokens, eos)
    beam = model.beam_search(pixels, max_new_tokens=10, num_beams=4)
    assert torch.equal(beam.lengths, _caption_lengths(beam.sequences, eos))
    expected = _sequence_log_prob(model, pixels, beam.sequences) / beam.lengths
    assert torch.allclose(beam.scores, expected, atol=1e-5)
    assert (beam.scores >= greedy - 1e-5).all(), (beam.scores, greedy)
    if kind == "partly_trained":
        # An unsure decoder is where the beam finds better captions than greedy (by 0.027 nats per word here).
        assert (beam.scores > greedy + 0.02).any(), (beam.scores, greedy)
    assert torch.equal(model.generate(pixels, max_new_tokens=10, num_beams=4), beam.sequences)


# --------------------------------------------------------------------------------- normalisation and parts


def test_normalize_uses_imagenet_statistics(captioner: ShowAttendTellCaptioner) -> None:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = torch.rand(2, 3, 4, 4)
    expected = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(captioner.normalize(pixels), expected)


def test_attention_belongs_to_the_decoder(captioner: ShowAttendTellCaptioner) -> None:
    assert isinstance(captioner.encoder, CNNEncoder)
    assert isinstance(captioner.decoder, AttentionLSTMDecoder)
    decoder = _param_ids(captioner.decoder)
    # The attention, its projection of the features and the initial-state layers are part of the decoder.
    for part in (captioner.decoder.attention, captioner.decoder.init_h, captioner.decoder.f_beta):
        assert _param_ids(part) <= decoder


@pytest.mark.parametrize("frozen", ["encoder", "decoder"])
def test_freezing_one_part_leaves_the_other_trainable(vocab: VocabInfo, batch: dict, frozen: str) -> None:
    torch.manual_seed(0)
    model = build_captioner("show_attend_tell", vocab, IMAGE_SIZE)
    trained = "decoder" if frozen == "encoder" else "encoder"
    getattr(model, frozen).requires_grad_(False)
    model(batch["pixel_values"], batch["labels"]).loss.backward()
    assert all(p.grad is None for p in getattr(model, frozen).parameters())
    assert all(p.grad is not None for p in getattr(model, trained).parameters())


def test_standard_preset_is_paper_001s_victim() -> None:
    """ResNet-101 pooled to 14x14 and sizes 512, built on the meta device (no memory, no init)."""
    config = SAT_PRESETS["standard"]
    assert (config.backbone, config.grid_size, config.dropout, config.alpha_c) == ("resnet101", 14, 0.5, 1.0)
    assert config.embed_dim == config.attention_dim == config.hidden_dim == 512
    with torch.device("meta"):
        model = build_captioner("show_attend_tell", VocabInfo(1000, 0, 1, 2), 256, preset="standard")
    # torchvision's ResNet-101 has 44_549_160 parameters, of which fc holds 2048 * 1000 + 1000.
    assert sum(p.numel() for p in model.encoder.parameters()) == 44_549_160 - 2_049_000
    assert model.encoder.channels == 2048 and model.encoder.grid_size == 14
    assert model.decoder.lstm.hidden_size == 512 and model.decoder.embedding.embedding_dim == 512
    assert model.decoder.attention.score.in_features == 512


def test_overrides_flat_or_grouped(vocab: VocabInfo) -> None:
    flat = build_captioner("show_attend_tell", vocab, 64, overrides={"hidden_dim": 32, "grid_size": 3})
    grouped = build_captioner(
        "show_attend_tell", vocab, 64, overrides={"encoder": {"grid_size": 3}, "decoder": {"hidden_dim": 32}}
    )
    for model in (flat, grouped):
        assert model.decoder.lstm.hidden_size == 32 and model.encoder.grid_size == 3
    # Without a grid size the grid is the trunk's own output: 64 px / stride 8.
    assert build_captioner("show_attend_tell", vocab, 64).encoder.grid_size == 8


# ---------------------------------------------------------------------------------------- encoder weights


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A full torchvision ResNet-18 classifier state_dict (fc included), saved with torch.save and as safetensors."""
    root = tmp_path_factory.mktemp("resnet18")
    torch.manual_seed(1)
    state = resnet18(weights=None).state_dict()
    assert any(k.startswith("fc.") for k in state)
    torch.save(state, root / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "resnet18.safetensors"))
    return {"state": state, "pth": root / "resnet18.pth", "safetensors": root / "resnet18.safetensors"}


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_encoder_weights_load_a_torchvision_resnet(vocab: VocabInfo, resnet18_files: dict, kind: str) -> None:
    model = build_captioner(
        "show_attend_tell",
        vocab,
        IMAGE_SIZE,
        overrides={"backbone": "resnet18", "grid_size": 2},
        encoder_weights=str(resnet18_files[kind]),
    )
    loaded = model.encoder.trunk.state_dict()
    expected = {k: v for k, v in resnet18_files["state"].items() if not k.startswith("fc.")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert model.encoder.channels == 512
    with torch.no_grad():
        assert model.eval()(_images(1), torch.tensor([[5, 2]])).attention.shape[2] == 4


def test_encoder_weights_through_the_lightning_module(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, batch: dict
) -> None:
    torch.manual_seed(0)
    source = build_captioner("show_attend_tell", VocabInfo.from_tokenizer(tokenizer), IMAGE_SIZE)
    torch.save(source.encoder.trunk.state_dict(), tmp_path / "tiny.pt")
    torch.manual_seed(1)
    settings = ShowAttendTellSettings(encoder_weights=str(tmp_path / "tiny.pt"))
    module = CaptioningModule.with_tokenizer(tokenizer, captioner=settings, image_size=IMAGE_SIZE)
    for key, value in source.encoder.trunk.state_dict().items():
        assert torch.equal(module.captioner.encoder.trunk.state_dict()[key], value), key
    assert module.hparams.captioner["init_args"]["encoder_weights"] == str(tmp_path / "tiny.pt")


def _encoder_weights_file(which: str, tmp_path: Path, resnet18_files: dict) -> tuple[str, dict]:
    """A bad encoder_weights file and the overrides of the model it is given to."""
    r18 = {"backbone": "resnet18", "grid_size": 2}
    if which == "missing":
        return str(tmp_path / "missing.pth"), {}
    if which == "garbage":
        (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
        return str(tmp_path / "garbage.pth"), r18
    if which == "not_a_state_dict":
        torch.save([torch.zeros(1)], tmp_path / "list.pth")
        return str(tmp_path / "list.pth"), r18
    if which == "other_arch":
        return str(resnet18_files["pth"]), {"backbone": "resnet34", "grid_size": 2}
    # A tiny trunk of other widths: same keys, other shapes.
    torch.save(
        build_captioner("show_attend_tell", VocabInfo(8, 0, 1, 2), 32).encoder.trunk.state_dict(), tmp_path / "t.pt"
    )
    return str(tmp_path / "t.pt"), {"widths": [8, 16, 32]}


@pytest.mark.parametrize(
    ("which", "message"),
    [
        (
            "missing",
            r"encoder_weights file \S*missing\.pth does not exist; it must hold the state_dict of this preset's",
        ),
        (
            "garbage",
            r"cannot read encoder_weights file \S*garbage\.pth as a torch\.save'd state_dict or a \.safetensors file "
            r"\(\w+\); it must hold the state_dict of a torchvision resnet18 \(fc\.\* keys are ignored\)",
        ),
        (
            "not_a_state_dict",
            r"encoder_weights file \S*list\.pth is not a state_dict of tensors; .*torchvision resnet18",
        ),
        (
            "other_arch",
            r"\S*resnet18\.pth does not fit: \d+ missing keys \(first: layer\S+\); .*a torchvision resnet34",
        ),
        ("other_widths", r"does not fit: \d+ shape mismatches \(first: conv1\.weight: \(16, 3, 3, 3\) in the file, "),
    ],
)
def test_encoder_weights_errors(
    vocab: VocabInfo, resnet18_files: dict, tmp_path: Path, which: str, message: str
) -> None:
    path, overrides = _encoder_weights_file(which, tmp_path, resnet18_files)
    with pytest.raises(RobucapError, match=message):
        build_captioner("show_attend_tell", vocab, IMAGE_SIZE, overrides=overrides, encoder_weights=path)


def _unreadable_bytes(name: str) -> bytes:
    """Bytes that are no state_dict file; the comment names what torch or safetensors raises reading them."""
    if name == "truncated.pth":  # RuntimeError: a zip archive without its central directory
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(64)}, buffer)
        return buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if name == "image.pth":  # UnpicklingError
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format="PNG")
        return buffer.getvalue()
    return {
        "empty.pth": b"",  # EOFError
        "notes.pth": b"hello",  # KeyError
        "config.pth": b"a: 1\nb: 2\n",  # IndexError
        "garbage.safetensors": b"not a safetensors file",  # SafetensorError
        "truncated.safetensors": (16).to_bytes(8, "little") + b'{"w": {',  # SafetensorError
    }[name]


UNREADABLE = ("truncated.pth", "image.pth", "empty.pth", "notes.pth", "config.pth", "garbage.safetensors")


@pytest.mark.parametrize("name", [*UNREADABLE, "truncated.safetensors"])
def test_encoder_weights_unreadable_files(vocab: VocabInfo, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_unreadable_bytes(name))
    message = rf"cannot read encoder_weights file \S*{re.escape(name)} as a torch\.save'd state_dict or a \.safetensors"
    with pytest.raises(RobucapError, match=message):
        build_captioner(
            "show_attend_tell", vocab, IMAGE_SIZE, overrides={"backbone": "resnet18"}, encoder_weights=str(path)
        )


@pytest.mark.parametrize("name", ["weights.pth", "weights.safetensors"])
def test_encoder_weights_loader_bug_is_not_bad_input(
    vocab: VocabInfo, resnet18_files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in the loading code")

    monkeypatch.setattr(cnn_encoder.torch, "load", broken)
    monkeypatch.setattr(cnn_encoder, "load_file", broken)
    kind = "safetensors" if name.endswith(".safetensors") else "pth"
    with pytest.raises(TypeError, match="a bug in the loading code"):
        build_captioner(
            "show_attend_tell", vocab, IMAGE_SIZE, overrides={"backbone": "resnet18"},
            encoder_weights=str(resnet18_files[kind]),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ build errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, r"unknown show_attend_tell preset 'huge'; expected one of \['standard', 'tiny'\]"),
        ({"pretrained_dir": "x"}, r"init_args \['pretrained_dir'\] are not options of ShowAttendTellSettings"),
        (
            {"encoder_dir": "x", "decoder_dir": "y"},
            r"\['decoder_dir', 'encoder_dir'\] are not options of ShowAttendTellSettings; expected \['preset', "
            r"'encoder_weights', 'overrides'\]",
        ),
        (
            {"overrides": {"hidden_size": 8}},
            r"unknown show_attend_tell override \['hidden_size'\]; allowed fields: \['backbone', 'widths', 'blocks', "
            r"'grid_size', 'embed_dim', 'attention_dim', 'hidden_dim', 'dropout', 'deep_output', 'alpha_c'\]",
        ),
        (
            {"overrides": {"encoder": {"hidden_dim": 8}}},
            r"show_attend_tell encoder overrides accept \['backbone', 'widths', 'blocks', 'grid_size'\], got "
            r"\['hidden_dim'\]",
        ),
        ({"overrides": {"backbone": "vgg16"}}, r"backbone must be one of \['tiny_resnet', 'resnet18', .*got 'vgg16'"),
        ({"overrides": {"hidden_dim": 0}}, "show_attend_tell hidden_dim must be an integer >= 1, got 0"),
        ({"overrides": {"dropout": 1.0}}, r"show_attend_tell dropout must be in \[0, 1\), got 1\.0"),
        ({"overrides": {"alpha_c": -1.0}}, "show_attend_tell alpha_c must be >= 0, got -1.0"),
        (
            {"overrides": {"widths": [8, 16], "blocks": [1]}},
            r"widths and blocks must be lists of integers >= 1 of the same length, got \[8, 16\] and \[1\]",
        ),
    ],
)
def test_build_errors(vocab: VocabInfo, kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        build_captioner("show_attend_tell", vocab, IMAGE_SIZE, **kwargs)


def test_image_smaller_than_the_stride(vocab: VocabInfo) -> None:
    with pytest.raises(
        RobucapError, match=re.escape("image_size 4 is smaller than the tiny_resnet encoder's stride 8")
    ):
        build_captioner("show_attend_tell", vocab, 4)


# ------------------------------------------------------------------------------------ training and attacks


def test_captioning_module_overfits_eight_images(tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    module = CaptioningModule.with_tokenizer(
        tokenizer, captioner="show_attend_tell", image_size=IMAGE_SIZE, lr=3e-3, warmup_steps=0
    )
    assert isinstance(module.captioner, ShowAttendTellCaptioner)
    images = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    items = [{"pixel_values": images[i], "caption": c, "image_id": i} for i, c in enumerate(MANY_CAPTIONS)]
    batch = CaptionCollator(tokenizer)(items)
    optimizer = module.configure_optimizers()["optimizer"]
    # The word embedding is exempt from weight decay.
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert id(module.captioner.decoder.embedding.weight) in no_decay
    module.train()
    losses = []
    for _ in range(60):
        loss = module(batch["pixel_values"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    module.eval()
    assert sum(a == b for a, b in zip(module.caption(batch["pixel_values"]), MANY_CAPTIONS, strict=True)) >= 6


def test_fgsm_on_show_attend_tell(captioner: ShowAttendTellCaptioner, batch: dict) -> None:
    epsilon = 8 / 255
    pixels, labels = batch["pixel_values"], batch["labels"]
    adversarial = FGSM(epsilon)(CaptionObjective(captioner, labels), pixels).adversarial
    assert (adversarial - pixels).abs().max() <= epsilon + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        before = caption_loss(captioner(pixels, labels).logits, labels, reduction="none")
        after = caption_loss(captioner(adversarial, labels).logits, labels, reduction="none")
    assert (after > before).all(), (before, after)
    assert not captioner.training
