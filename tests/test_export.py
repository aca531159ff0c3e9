"""`robucap export`: the directory loads with from_pretrained and captions through pipeline("image-to-text")."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, VisionEncoderDecoderModel, pipeline

from lightning_app.export import export_checkpoint, load_module


def test_export_pipeline_matches_module(trained_checkpoint: Path, shapes_root: Path, tmp_path: Path) -> None:
    out = export_checkpoint(trained_checkpoint, tmp_path / "export")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name

    model = VisionEncoderDecoderModel.from_pretrained(out)
    assert model.config.decoder_start_token_id == AutoTokenizer.from_pretrained(out).bos_token_id

    image_path = sorted((shapes_root / "images/test").glob("*.png"))[0]
    captioner = pipeline("image-to-text", model=str(out))
    result = captioner(Image.open(image_path))
    text = result[0]["generated_text"].strip()
    assert text and text.split()[0] in {"a", "there", "the", "three", "two", "from"}

    # The exported pipeline (its own resize + normalisation) says what the Lightning module says.
    module = load_module(trained_checkpoint)
    from datamodules.images import load_image

    pixels = load_image(image_path, module.captioner.image_size).unsqueeze(0)
    assert module.caption(pixels)[0] == text


def test_checkpoint_weights_only_round_trip(trained_checkpoint: Path) -> None:
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    assert "robucap_tokenizer" in checkpoint
    module = load_module(trained_checkpoint)
    state = checkpoint["state_dict"]
    for name, value in module.state_dict().items():
        assert torch.equal(value, state[name]), name
