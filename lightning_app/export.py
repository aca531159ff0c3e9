"""``robucap export``: a checkpoint to a transformers directory that ``pipeline("image-to-text")`` loads."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from transformers import ViTImageProcessor

from datamodules.errors import RobucapError
from modules.captioners import ViTGPT2Captioner
from modules.captioning import CaptioningModule, read_checkpoint_tokenizer


def load_module(checkpoint: str | Path) -> CaptioningModule:
    """Load a trained :class:`CaptioningModule` on CPU in eval mode, without executing pickled code."""
    path = Path(checkpoint)
    read_checkpoint_tokenizer(path)  # clear errors for a missing, corrupt or foreign file
    module = CaptioningModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.eval()


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write model (safetensors), tokenizer, image processor and generation config to ``out``.

    The image processor resizes to the training size, rescales to [0, 1] and applies the captioner's own
    normalisation, so the exported model sees exactly what it saw in training.

    Raises:
        RobucapError: The checkpoint is missing or not a robucap captioner, or its architecture cannot be exported.
    """
    module = load_module(checkpoint)
    captioner = module.captioner
    if not isinstance(captioner, ViTGPT2Captioner):
        raise RobucapError(f"only ViT-GPT2 captioners export to transformers, not {type(captioner).__name__}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = captioner.model
    model.generation_config.max_new_tokens = module.hparams.max_new_tokens
    model.generation_config.num_beams = module.hparams.num_beams
    model.save_pretrained(out, safe_serialization=True)
    module.tokenizer.save_pretrained(out)
    size = captioner.image_size
    ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=captioner.normalize.mean.flatten().tolist(),
        image_std=captioner.normalize.std.flatten().tolist(),
    ).save_pretrained(out)
    return out
