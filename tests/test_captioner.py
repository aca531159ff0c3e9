"""ViT-GPT2 captioner: normalisation, named parts, presets, pretrained loading and build errors (the contract every
captioner meets is tests/test_captioner_contract.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTModel,
)

from datamodules.collate import CaptionCollator
from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo, build_word_tokenizer
from modules.captioners import (
    PRESETS,
    ViTGPT2Captioner,
    build_captioner,
    caption_loss,
)

IMAGE_SIZE = 32
CAPTIONS = ["a red circle on the left", "two blue squares"]
# A ViT narrower than the tiny preset's GPT-2 (64), so an encoder-to-decoder projection is needed.
NARROW_ENCODER = {"encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}}
# What a GPT-2 tokenizer looks like to the captioner: pad = bos = eos = the last id.
GPT2_VOCAB = VocabInfo(vocab_size=300, pad_token_id=299, bos_token_id=299, eos_token_id=299)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def vocab(tokenizer: PreTrainedTokenizerFast) -> VocabInfo:
    return VocabInfo.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def captioner(vocab: VocabInfo) -> ViTGPT2Captioner:
    """A tiny, randomly initialised captioner in eval mode (tests must not train it)."""
    torch.manual_seed(0)
    return build_captioner("vit_gpt2", vocab, IMAGE_SIZE, preset="tiny").eval()


@pytest.fixture(scope="module")
def batch(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Two distinct images with the two captions (the second one padded)."""
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    items = [{"pixel_values": images[i], "caption": c, "image_id": i} for i, c in enumerate(CAPTIONS)]
    return CaptionCollator(tokenizer)(items)


def _param_ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _assert_state_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        assert key in actual, key
        assert torch.equal(actual[key], value), key


# --------------------------------------------------------------------------------------- forward and loss


def test_caption_loss_reductions_match_manual_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    labels[0, 3:] = -100
    labels[2, 1:] = -100
    lengths = labels.ne(-100).sum(1)
    manual = torch.stack([F.cross_entropy(logits[i, : lengths[i]], labels[i, : lengths[i]]) for i in range(3)])
    assert torch.allclose(caption_loss(logits, labels, reduction="none"), manual)
    # "mean" weighs every label token of the batch equally; "sum" adds them up.
    token_sum = (manual * lengths).sum()
    assert torch.allclose(caption_loss(logits, labels, reduction="sum"), token_sum)
    assert torch.allclose(caption_loss(logits, labels), token_sum / lengths.sum())
    assert torch.allclose(caption_loss(logits, labels), F.cross_entropy(logits.transpose(1, 2), labels))


# --------------------------------------------------------------------------------- normalisation and parts


def test_normalize_uses_vit_mean_and_std(captioner: ViTGPT2Captioner) -> None:
    pixels = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    out = captioner.normalize(pixels)
    assert torch.equal(out[0], torch.full((3, 4, 4), -1.0))
    assert torch.equal(out[1], torch.zeros(3, 4, 4))
    assert torch.equal(out[2], torch.ones(3, 4, 4))


def test_parts_without_projection(captioner: ViTGPT2Captioner) -> None:
    assert isinstance(captioner.encoder, ViTModel)
    assert getattr(captioner.model, "enc_to_dec_proj", None) is None
    assert any("crossattention" in name for name, _ in captioner.decoder.named_parameters())
    assert not any("crossattention" in name for name, _ in captioner.encoder.named_parameters())
    encoder, decoder = _param_ids(captioner.encoder), _param_ids(captioner.decoder)
    assert not encoder & decoder
    assert encoder | decoder == _param_ids(captioner)


def test_parts_with_projection(vocab: VocabInfo) -> None:
    """When the ViT is narrower than GPT-2 the projection belongs to the decoder."""
    model = build_captioner("vit_gpt2", vocab, IMAGE_SIZE, preset="tiny", overrides=NARROW_ENCODER)
    assert model.encoder.config.hidden_size == 32 and model.model.config.decoder.n_embd == 64
    assert isinstance(model.encoder, ViTModel)
    proj = model.model.enc_to_dec_proj
    assert any(module is proj for module in model.decoder.modules())
    assert any("crossattention" in name for name, _ in model.decoder.named_parameters())
    encoder, decoder = _param_ids(model.encoder), _param_ids(model.decoder)
    assert not encoder & decoder
    assert encoder | decoder == _param_ids(model)
    assert _param_ids(proj) <= decoder
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([[4, 5, vocab.eos_token_id]]))
    assert out.logits.shape == (1, 3, vocab.vocab_size)


def test_base_preset_has_vit_b16_and_gpt2_124m_shapes() -> None:
    """Config fields, plus parameter counts from a build on the meta device (no memory, no init)."""
    enc, dec = PRESETS["base"]["encoder"], PRESETS["base"]["decoder"]
    assert enc == {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 16,
    }
    assert dec == {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
    with torch.device("meta"):
        model = build_captioner("vit_gpt2", VocabInfo(50257, 50256, 50256, 50256), 224, preset="base")
    assert sum(p.numel() for p in model.encoder.parameters()) == 86_389_248  # ViT-B/16 with pooler
    gpt2 = model.model.decoder.transformer.named_parameters()
    assert sum(p.numel() for n, p in gpt2 if "crossattention" not in n and "ln_cross_attn" not in n) == 124_439_808


# --------------------------------------------------------------------------------------- pretrained loading


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ViT (hidden 32) and a tiny GPT-2 (hidden 64) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB.vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=64))
    vit.save_pretrained(root / "vit")
    gpt2.save_pretrained(root / "gpt2")
    return {"root": root, "vit": vit, "gpt2": gpt2}


def test_load_encoder_and_decoder_pretrained(pretrained: dict) -> None:
    root = pretrained["root"]
    for name in ("vit", "gpt2"):
        assert (root / name / "model.safetensors").is_file(), name
    model = build_captioner(
        "vit_gpt2",
        GPT2_VOCAB,
        IMAGE_SIZE,
        preset="pretrained",
        encoder_dir=str(root / "vit"),
        decoder_dir=str(root / "gpt2"),
    )
    _assert_state_equal(pretrained["vit"].state_dict(), model.encoder.state_dict())
    _assert_state_equal(pretrained["gpt2"].state_dict(), model.model.decoder.state_dict())
    # Cross-attention and the 32 -> 64 projection are new and belong to the decoder.
    assert any("crossattention" in name for name, _ in model.decoder.named_parameters())
    assert any(module is model.model.enc_to_dec_proj for module in model.decoder.modules())
    assert model.model.config.decoder_start_token_id == GPT2_VOCAB.bos_token_id
    assert model.image_size == IMAGE_SIZE
    tokens = model.eval().generate(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE), max_new_tokens=3)
    assert tokens.shape[0] == 1 and tokens.shape[1] <= 3


def test_load_full_vision_encoder_decoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = build_captioner("vit_gpt2", GPT2_VOCAB, IMAGE_SIZE, preset="tiny").eval()
    original.model.save_pretrained(tmp_path / "ved")
    assert (tmp_path / "ved" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "ved" / "config.json").read_text())["model_type"] == "vision-encoder-decoder"
    loaded = build_captioner(
        "vit_gpt2", GPT2_VOCAB, IMAGE_SIZE, preset="pretrained", pretrained_dir=str(tmp_path / "ved")
    )
    assert loaded.state_dict().keys() == original.state_dict().keys()
    _assert_state_equal(original.state_dict(), loaded.state_dict())
    pixels, labels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([[5, 6, 299], [7, 299, -100]])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(pixels, labels).logits, original(pixels, labels).logits, atol=1e-6)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose config.json describes a BERT model (no weights needed: the type check comes first)."""
    path = tmp_path_factory.mktemp("bert")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing_encoder", r"encoder directory \S*missing does not exist"),
        ("missing_pretrained", r"pretrained directory \S*missing does not exist"),
        ("no_config", r"decoder directory \S*empty has no config\.json \(expected a save_pretrained directory\)"),
        ("bert_decoder", r"holds a 'bert' model; expected GPT-2 \('gpt2'\)"),
        ("gpt2_encoder", r"holds a 'gpt2' model; expected a ViT \('vit'\)"),
        ("gpt2_as_pretrained", r"holds a 'gpt2' model; expected a VisionEncoderDecoder model"),
        ("no_directories", "preset 'pretrained' needs pretrained_dir, or both encoder_dir and decoder_dir"),
        ("both", "give either pretrained_dir or encoder_dir \\+ decoder_dir, not both"),
    ],
)
def test_pretrained_directory_errors(
    pretrained: dict, bert_dir: Path, tmp_path: Path, which: str, message: str
) -> None:
    root = pretrained["root"]
    vit, gpt2 = str(root / "vit"), str(root / "gpt2")
    (tmp_path / "empty").mkdir()
    kwargs = {
        "missing_encoder": {"encoder_dir": str(tmp_path / "missing"), "decoder_dir": gpt2},
        "missing_pretrained": {"pretrained_dir": str(tmp_path / "missing")},
        "no_config": {"encoder_dir": vit, "decoder_dir": str(tmp_path / "empty")},
        "bert_decoder": {"encoder_dir": vit, "decoder_dir": str(bert_dir)},
        "gpt2_encoder": {"encoder_dir": gpt2, "decoder_dir": gpt2},
        "gpt2_as_pretrained": {"pretrained_dir": gpt2},
        "no_directories": {},
        "both": {"pretrained_dir": gpt2, "encoder_dir": vit, "decoder_dir": gpt2},
    }[which]
    with pytest.raises(RobucapError, match=message):
        build_captioner("vit_gpt2", GPT2_VOCAB, IMAGE_SIZE, preset="pretrained", **kwargs)


def test_pretrained_vocab_mismatch_suggests_the_decoders_tokenizer(pretrained: dict, vocab: VocabInfo) -> None:
    root = pretrained["root"]
    message = re.escape(f"the decoder has a vocabulary of 300 tokens but the tokenizer has {vocab.vocab_size}")
    with pytest.raises(RobucapError, match=message + r".*data\.tokenizer="):
        build_captioner(
            "vit_gpt2",
            vocab,
            IMAGE_SIZE,
            preset="pretrained",
            encoder_dir=str(root / "vit"),
            decoder_dir=str(root / "gpt2"),
        )


def test_pretrained_image_size_mismatch(pretrained: dict) -> None:
    root = pretrained["root"]
    with pytest.raises(RobucapError, match="expects 32 px images but data.image_size is 64; set data.image_size=32"):
        build_captioner(
            "vit_gpt2",
            GPT2_VOCAB,
            64,
            preset="pretrained",
            encoder_dir=str(root / "vit"),
            decoder_dir=str(root / "gpt2"),
        )


# ------------------------------------------------------------------------------------------ build errors


def test_unknown_preset(vocab: VocabInfo) -> None:
    with pytest.raises(RobucapError, match=r"unknown model preset 'huge'; expected one of \['base', 'tiny'\]"):
        build_captioner("vit_gpt2", vocab, IMAGE_SIZE, preset="huge")


def test_image_size_not_a_multiple_of_the_patch_size(vocab: VocabInfo) -> None:
    with pytest.raises(RobucapError, match="image_size 36 is not a multiple of the ViT patch size 8"):
        build_captioner("vit_gpt2", vocab, 36, preset="tiny")


def test_other_build_errors(vocab: VocabInfo, pretrained: dict) -> None:
    message = r"class_path 'lstm' is not a registered name \(\[.*'show_attend_tell'.*'vit_gpt2'"
    with pytest.raises(RobucapError, match=message):
        build_captioner("lstm", vocab, IMAGE_SIZE)
    with pytest.raises(RobucapError, match=r"overrides accept the keys 'encoder' and 'decoder', got \['vit'\]"):
        build_captioner("vit_gpt2", vocab, IMAGE_SIZE, overrides={"vit": {}})
    with pytest.raises(RobucapError, match="need preset='pretrained', not 'tiny'"):
        build_captioner("vit_gpt2", vocab, IMAGE_SIZE, preset="tiny", pretrained_dir=str(pretrained["root"]))
