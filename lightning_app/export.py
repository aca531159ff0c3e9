"""``robucap export``: a checkpoint to a transformers directory that captions exactly as the Lightning module.

The directory holds the model (safetensors), the tokenizer, the generation settings and three small modules that
transformers loads with ``trust_remote_code=True`` (robucap need not be installed):

* ``image_processing_robucap.py`` + ``image_decode.py``: the image processor. It decodes files exactly as robucap's
  loaders do (EXIF orientation, transparency on white, 16-bit scaled, bicubic resize without crop) and normalises
  like the captioner, bit for bit. transformers' stock ``ViTImageProcessor`` cannot: it drops alpha and clips
  16-bit images.
* ``pipeline_robucap.py``: ``pipeline("image-to-text")`` that gives the file to that processor undecoded (the stock
  pipeline converts every image to RGB first, losing alpha and 16-bit range).
* ``modeling_robucap.py``: the model class with the right training loss (transformers 4.57 shifts the labels twice,
  issue #40111); ``AutoModelForImageTextToText`` loads it.

``robucap_export.json`` marks the directory as an export and lists the files written, so that a later export may
replace exactly those files and never a user's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import VisionEncoderDecoderModel

from datamodules.errors import RobucapError
from datamodules.image_processing_robucap import RobucapImageProcessor
from modules.captioning import CaptioningModule, read_checkpoint_tokenizer

__all__ = ["EXPORT_MARKER", "export_checkpoint", "load_module"]

EXPORT_MARKER = "robucap_export.json"
_MARKER_FORMAT = 1
_CODE_DIR = Path(__file__).resolve().parent / "export_code"
# Copied into the export; the image processor's modules are copied by transformers when it is saved.
_CODE_FILES = ("modeling_robucap.py", "pipeline_robucap.py")
_MODEL_CLASS = "modeling_robucap.RobucapVisionEncoderDecoderModel"
_PIPELINE_CLASS = "pipeline_robucap.RobucapImageToTextPipeline"


def load_module(checkpoint: str | Path) -> CaptioningModule:
    """Load a trained :class:`CaptioningModule` on CPU in eval mode, without executing pickled code."""
    path = Path(checkpoint)
    read_checkpoint_tokenizer(path)  # clear errors for a missing, corrupt or foreign file
    module = CaptioningModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.eval()


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write model, tokenizer, image processor, generation config and loading code to ``out``.

    ``out`` must not exist, be an empty directory, or hold a previous robucap export (whose files are replaced;
    anything else in it is kept).

    Args:
        checkpoint: A checkpoint written by ``robucap fit``.
        out: The export directory.

    Returns:
        ``out``.

    Raises:
        RobucapError: ``out`` is a file, a non-empty directory that is not a robucap export, or cannot be created;
            the checkpoint is missing or not a robucap captioner; or its architecture cannot be exported.
    """
    out = Path(out)
    previous = _previous_export_files(out)
    module = load_module(checkpoint)
    captioner = module.captioner
    # The captioner says whether it has a transformers form (Captioner.transformers_model raises if not).
    model = captioner.transformers_model()
    if not isinstance(model, VisionEncoderDecoderModel):
        raise RobucapError(
            f"the {type(captioner).__name__} captioner's transformers model is a {type(model).__name__}; the export's "
            "loading code supports VisionEncoderDecoderModel captioners only"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RobucapError(f"cannot create the export directory {out}: {error.strerror or error}") from error
    for name in previous:
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    before = set(os.listdir(out))

    model.generation_config.max_new_tokens = module.hparams.max_new_tokens
    model.generation_config.num_beams = module.hparams.num_beams
    # Loaded with trust_remote_code=True: the model class with the right loss, and the pipeline that keeps alpha
    # and 16-bit images for the image processor. Without it, VisionEncoderDecoderModel still loads and generates.
    model.config.auto_map = {"AutoModelForImageTextToText": _MODEL_CLASS, "AutoModelForVision2Seq": _MODEL_CLASS}
    model.config.custom_pipelines = {
        "image-to-text": {"impl": _PIPELINE_CLASS, "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}
    }
    model.save_pretrained(out, safe_serialization=True)
    module.tokenizer.save_pretrained(out)
    size = captioner.image_size
    processor = RobucapImageProcessor(
        size={"height": size, "width": size},
        image_mean=captioner.normalize.mean.flatten().tolist(),
        image_std=captioner.normalize.std.flatten().tolist(),
    )
    # Makes save_pretrained copy the processor's modules and record them in auto_map.
    processor.register_for_auto_class("AutoImageProcessor")
    processor.save_pretrained(out)
    for name in _CODE_FILES:
        shutil.copyfile(_CODE_DIR / name, out / name)

    written = sorted(set(os.listdir(out)) - before)
    marker = {"format": _MARKER_FORMAT, "checkpoint": str(Path(checkpoint).resolve()), "files": written}
    (out / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return out


def _previous_export_files(out: Path) -> list[str]:
    """Files of a previous export in ``out`` to replace; empty for a new or empty directory.

    Raises:
        RobucapError: ``out`` is a file, or a non-empty directory without a valid export marker.
    """
    if not out.exists():
        return []
    if not out.is_dir():
        raise RobucapError(
            f"export directory {out} is an existing file; give a new or empty directory, or a previous export"
        )
    entries = sorted(os.listdir(out))
    if not entries:
        return []
    refusal = (
        f"export directory {out} is not empty and is not a robucap export (no valid {EXPORT_MARKER}; it holds "
        f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}): give a new or empty directory"
    )
    try:
        marker = json.loads((out / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RobucapError(refusal) from None
    files = marker.get("files") if isinstance(marker, dict) else None
    # Only plain names inside `out` may be deleted, whatever the marker says.
    if not isinstance(files, list) or not all(
        isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name for name in files
    ):
        raise RobucapError(refusal)
    return [*files, EXPORT_MARKER]
