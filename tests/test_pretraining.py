"""Pretrained parts made here (docs/pretraining.md): each task trains through ``robucap fit``, beats chance, and
writes a ``save_pretrained`` directory that ``preset: pretrained`` loads as it would load ``google/vit-*`` and
``gpt2``."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.errors import DataError, RobucapError
from datamodules.pretraining import (
    ATTRIBUTE_LABELS,
    ShapeObject,
    ShapesAttributesDataModule,
    attribute_vector,
    read_attributes,
    region_map,
)
from datamodules.tokenizer import VocabInfo, load_tokenizer
from lightning_app.cli import main
from lightning_app.dense_cli import dense_victim
from modules.captioners.vit_gpt2 import ViTGPT2Settings
from modules.captioning import CaptioningModule
from modules.pretraining import DecoderPretraining, EncoderPretraining

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiment"
ENCODER_CONFIG = str(CONFIGS / "shapes_pretrain_encoder.yaml")
DECODER_CONFIG = str(CONFIGS / "shapes_pretrain_decoder.yaml")
# The conftest's shapes_root: the data modules must be told its generator settings, or they refuse it.
SHAPES = ["--data.shapes.n_train", "160", "--data.shapes.n_val", "21", "--data.shapes.n_test", "15"]
SHAPES += ["--data.shapes.seed", "3", "--data.progress", "false"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
QUIET += ["--trainer.log_every_n_steps", "1"]


@dataclass(frozen=True)
class Run:
    """One finished ``robucap fit`` of a pretraining config.

    Attributes:
        out: Its ``trainer.default_root_dir``.
        export: The ``save_pretrained`` directory it wrote.
        rows: The CSV logger's rows.
    """

    out: Path
    export: Path
    rows: list[dict[str, str]]

    def column(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.rows if row.get(name)]


def _fit(config: str, out: Path, *extra: str) -> Run:
    args = ["fit", "--config", config, "--config", str(CONFIGS.parent / "logger" / "csv.yaml"), *SHAPES, *QUIET]
    assert main([*args, "--trainer.default_root_dir", str(out), "--model.init_args.warmup_steps", "5", *extra]) == 0
    (metrics,) = out.rglob("metrics.csv")
    with metrics.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return Run(out, out / "pretrained", rows)


@pytest.fixture(scope="module")
def encoder_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("encoder")
    data = ["--data.root", str(shapes_root), "--data.image_size", "32", "--data.batch_size", "16"]
    return _fit(ENCODER_CONFIG, out, *data, "--trainer.max_epochs", "4", "--model.init_args.lr", "0.005")


@pytest.fixture(scope="module")
def decoder_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("decoder")
    data = ["--data.root", str(shapes_root), "--data.shapes.image_size", "32", "--data.batch_size", "32"]
    return _fit(DECODER_CONFIG, out, *data, "--trainer.max_epochs", "1")


def test_configs_route_to_the_pretraining_modules() -> None:
    assert dense_victim(["fit", "--config", ENCODER_CONFIG]) == "encoder_pretraining"
    assert dense_victim(["fit", "--config", DECODER_CONFIG]) == "decoder_pretraining"
    # A captioner config given later decides for the captioner, as for the dense victims.
    tiny = str(CONFIGS / "shapes_tiny.yaml")
    assert dense_victim(["fit", "--config", ENCODER_CONFIG, "--config", tiny]) is None


def _chance_loss(shapes_root: Path) -> float:
    """Binary cross-entropy of predicting every validation label with its training frequency."""
    data = ShapesAttributesDataModule(root=str(shapes_root), image_size=32, progress=False, shapes=_shapes_options())
    data.setup("fit")
    prior = data.datasets["train"].labels.mean(0).clamp(1e-6, 1 - 1e-6)
    val = data.datasets["val"].labels
    return float(-(val * prior.log() + (1 - val) * (1 - prior).log()).mean())


def test_encoder_pretraining_learns_the_attributes(encoder_run: Run, shapes_root: Path) -> None:
    losses = encoder_run.column("train/loss")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # Held-out images: the validation loss falls epoch after epoch (30 steps are too few to beat the label prior
    # while the patch heads learn too; the real run's val/label_loss vs val/chance_loss is in docs/pretraining.md).
    val = encoder_run.column("val/loss")
    assert len(val) == 4 and val[-1] < 0.9 * val[0]
    chance = encoder_run.column("val/chance_loss")[-1]
    assert chance == pytest.approx(_chance_loss(shapes_root), rel=1e-5)
    assert 0 < encoder_run.column("val/f1")[-1] <= 1 and 0 < encoder_run.column("val/region_accuracy")[-1] <= 1
    files = {p.name for p in encoder_run.export.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    config = json.loads((encoder_run.export / "config.json").read_text())
    assert (config["model_type"], config["image_size"], config["hidden_size"], config["patch_size"]) == (
        "vit",
        32,
        64,
        8,
    )
    best = next(encoder_run.out.rglob("best.ckpt"))
    assert dense_victim(["validate", "--ckpt_path", str(best)]) == "encoder_pretraining"


def test_decoder_pretraining_learns_the_caption_language(decoder_run: Run) -> None:
    losses = decoder_run.column("train/loss")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    vocab = len(load_tokenizer(decoder_run.export))
    # A model that knows nothing has the vocabulary's perplexity; one epoch of captions is far below it.
    (perplexity,) = decoder_run.column("val/perplexity")
    assert perplexity < vocab / 3
    assert decoder_run.column("val/loss")[-1] == pytest.approx(math.log(perplexity), rel=1e-4)
    config = json.loads((decoder_run.export / "config.json").read_text())
    assert config["model_type"] == "gpt2" and not config.get("add_cross_attention")
    assert (config["n_embd"], config["n_layer"], config["vocab_size"]) == (64, 2, vocab)


def test_decoder_validates_from_its_checkpoint_with_its_own_tokenizer(decoder_run: Run, shapes_root: Path) -> None:
    from lightning_app.lightning_cli import run_lightning_cli

    best = next(decoder_run.out.rglob("best.ckpt"))
    (fitted,) = decoder_run.column("val/perplexity")
    args = ["validate", "--ckpt_path", str(best), "--data.root", str(shapes_root), "--data.shapes.image_size", "32"]
    cli = run_lightning_cli([*args, *SHAPES, *QUIET, "--trainer.logger", "false"])
    assert isinstance(cli.model, DecoderPretraining)
    assert float(cli.trainer.callback_metrics["val/perplexity"]) == pytest.approx(fitted, rel=1e-5)


def _captioner_module(encoder_dir: Path, decoder_dir: Path) -> CaptioningModule:
    settings = ViTGPT2Settings(preset="pretrained", encoder_dir=str(encoder_dir), decoder_dir=str(decoder_dir))
    return CaptioningModule.with_tokenizer(load_tokenizer(decoder_dir), captioner=settings, image_size=32)


def test_the_parts_load_through_preset_pretrained(encoder_run: Run, decoder_run: Run, shapes_root: Path) -> None:
    module = _captioner_module(encoder_run.export, decoder_run.export)
    model = module.captioner.model
    saved_encoder = load_file(str(encoder_run.export / "model.safetensors"))
    encoder_state = model.encoder.state_dict()
    assert set(saved_encoder) == set(encoder_state)
    for name, value in saved_encoder.items():
        assert torch.equal(encoder_state[name], value), name
    saved_decoder = load_file(str(decoder_run.export / "model.safetensors"))
    decoder_state = model.decoder.state_dict()
    for name, value in saved_decoder.items():
        assert torch.equal(decoder_state[name], value), name
    # GPT-2's output layer is its token embedding (tied, so saved once), in the captioner too.
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight
    # What the decoder has beyond the saved GPT-2 is exactly the new cross-attention (and its layer norms).
    new = set(decoder_state) - set(saved_decoder) - {"lm_head.weight"}
    assert new and all("crossattention" in name or "ln_cross_attn" in name for name in new)
    # It captions: words of the shapes vocabulary, from the decoder's own tokenizer.
    records = ShapesAttributesDataModule(root=str(shapes_root), image_size=32, progress=False, shapes=_shapes_options())
    records.setup("fit")
    images = torch.stack([records.datasets["val"][i][0] for i in range(2)])
    captions = module.caption(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    vocabulary = set(load_tokenizer(decoder_run.export).get_vocab())
    assert all(word in vocabulary for caption in captions for word in caption.split())


def _shapes_options() -> dict[str, int]:
    return {"n_train": 160, "n_val": 21, "n_test": 15, "seed": 3, "image_size": 32}


def test_a_captioner_fits_from_the_parts(encoder_run: Run, decoder_run: Run, shapes_root: Path, tmp_path: Path) -> None:
    # What the freeze study's pretrained regime runs: the captioner CLI with preset 'pretrained' and data.tokenizer.
    args = [
        "fit",
        "--config",
        str(CONFIGS / "shapes_tiny.yaml"),
        "--data.format",
        "coco",
        "--data.root",
        str(shapes_root),
    ]
    args += ["--data.image_size", "32", "--data.limit_train", "32", "--data.limit_val", "8", "--data.progress", "false"]
    args += ["--data.tokenizer", str(decoder_run.export), "--model.captioner.init_args.preset", "pretrained"]
    args += ["--model.captioner.init_args.encoder_dir", str(encoder_run.export)]
    args += ["--model.captioner.init_args.decoder_dir", str(decoder_run.export), "--trainer.max_epochs", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *QUIET]
    assert main(args) == 0
    assert next(tmp_path.rglob("last.ckpt")).is_file()


def test_swapped_and_missing_directories_are_one_line_errors(
    encoder_run: Run, decoder_run: Run, shapes_root: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    vocab = VocabInfo.from_tokenizer(load_tokenizer(decoder_run.export))
    enc, dec = str(encoder_run.export), str(decoder_run.export)
    with pytest.raises(RobucapError, match=r"^encoder directory .* holds a 'gpt2' model; expected a ViT \('vit'\)$"):
        ViTGPT2Settings(preset="pretrained", encoder_dir=dec, decoder_dir=dec).build(vocab, 32)
    with pytest.raises(RobucapError, match=r"^decoder directory .* holds a 'vit' model; expected GPT-2 \('gpt2'\)$"):
        ViTGPT2Settings(preset="pretrained", encoder_dir=enc, decoder_dir=enc).build(vocab, 32)
    missing = str(tmp_path / "nothing")
    with pytest.raises(RobucapError, match=r"^encoder directory .*nothing does not exist$"):
        ViTGPT2Settings(preset="pretrained", encoder_dir=missing, decoder_dir=dec).build(vocab, 32)
    with pytest.raises(RobucapError, match=r"expects 32 px images but data.image_size is 64"):
        ViTGPT2Settings(preset="pretrained", encoder_dir=enc, decoder_dir=dec).build(vocab, 64)
    # Through the command: encoder_dir pointing at the decoder's directory ends in one line, exit status 2.
    args = [
        "fit",
        "--config",
        str(CONFIGS / "shapes_tiny.yaml"),
        "--data.format",
        "coco",
        "--data.root",
        str(shapes_root),
    ]
    args += ["--data.tokenizer", dec, "--data.image_size", "32", "--model.captioner.init_args.preset", "pretrained"]
    args += ["--model.captioner.init_args.encoder_dir", dec, "--model.captioner.init_args.decoder_dir", dec]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--data.progress", "false"]
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("robucap: error: encoder directory") and "holds a 'gpt2' model" in error
    assert "\n" not in error


def test_attribute_labels_and_regions_of_a_hand_worked_image() -> None:
    circle = ShapeObject("circle", "red", "large", (0.0, 0.0, 0.5, 0.5))
    square = ShapeObject("square", "blue", "small", (0.75, 0.5, 0.25, 0.25))
    vector = attribute_vector([circle, square])
    on = {ATTRIBUTE_LABELS[i] for i in vector.nonzero().flatten().tolist()}
    assert on == {
        "shape:circle", "shape:square", "color:red", "color:blue", "size:large", "size:small",
        "pair:red circle", "pair:blue square", "count:2",
    }  # fmt: skip
    assert len(ATTRIBUTE_LABELS) == 5 + 6 + 2 + 30 + 3
    regions = region_map([circle, square], 4)  # pixel centres at 1/8, 3/8, 5/8, 7/8
    expected_shape = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]])
    assert torch.equal(regions[0], expected_shape)
    assert torch.equal(regions[1], expected_shape.masked_fill(expected_shape.eq(2), 5))  # blue: 5th colour
    assert torch.equal(
        regions[2], expected_shape.masked_fill(expected_shape.eq(1), 2).masked_fill(expected_shape.eq(2), 1)
    )


def test_read_attributes_of_generated_shapes(shapes_root: Path) -> None:
    objects = read_attributes(shapes_root / "annotations" / "instances_val.json")
    captions = json.loads((shapes_root / "annotations" / "captions_val.json").read_text())
    canonical = {}
    for annotation in sorted(captions["annotations"], key=lambda a: a["id"]):
        canonical.setdefault(annotation["image_id"], annotation["caption"])  # caption #0: objects left to right
    assert set(objects) == set(canonical)
    for image_id, caption in canonical.items():
        phrases = [f"a {o.size} {o.color} {o.shape}" for o in sorted(objects[image_id], key=lambda o: o.box[0])]
        positions = [caption.index(phrase) for phrase in phrases]
        assert positions == sorted(positions), caption
        assert all(0 <= o.box[0] < o.box[0] + o.box[2] <= 1 for o in objects[image_id])


def test_instances_without_attributes_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "instances_train.json"
    image = {"id": 1, "file_name": "a.png", "width": 8, "height": 8}
    annotation = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}
    path.write_text(
        json.dumps({"images": [image], "annotations": [annotation], "categories": [{"id": 1, "name": "circle"}]})
    )
    with pytest.raises(DataError, match=r"annotation 7 has shape 'circle', color None, size None; expected the shapes"):
        read_attributes(path)
    with pytest.raises(DataError, match=r"expects an instances file at .*missing.json"):
        read_attributes(tmp_path / "missing.json")
    path.write_text("{")
    with pytest.raises(DataError, match=r"is not valid JSON"):
        read_attributes(path)


def test_bad_module_options_are_one_line_errors() -> None:
    with pytest.raises(
        RobucapError, match=r"^model.init_args.preset must be a captioner preset, one of \['base', 'tiny'\]"
    ):
        EncoderPretraining(preset="pretrained")
    with pytest.raises(
        RobucapError, match=r"^data.image_size 36 is not a multiple of the tiny encoder's patch size 8$"
    ):
        EncoderPretraining(image_size=36)
    with pytest.raises(RobucapError, match=r"^model.init_args.lr must be > 0, got 0"):
        DecoderPretraining(lr=0)
