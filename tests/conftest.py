"""Test-wide settings: offline, deterministic, CPU only."""

from __future__ import annotations

import os
import tempfile

# Before transformers or wandb is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PYTHONHASHSEED"] = "0"
# Two cores and several processes (DDP tests): one intra-op thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Exports load with trust_remote_code: transformers copies their code into its modules cache, kept out of ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="robucap-hf-modules-"))
# Help texts are cached (lightning_app/help_cache.py); tests must not read or fill the user's cache.
os.environ.setdefault("ROBUCAP_CACHE_DIR", tempfile.mkdtemp(prefix="robucap-cache-"))

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from 2 threads; on a busy 2-core machine OpenMP spinning makes them ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes dataset (32 px) shared by the whole session: 160 train, 21 val (odd), 15 test images."""
    from datamodules.shapes import ShapesConfig, generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, ShapesConfig(n_train=160, n_val=21, n_test=15, image_size=32, seed=3), progress=False)
    return root


def _train_tiny(shapes_root: Path, out: Path, epochs: int) -> Path:
    """Train the tiny ViT-GPT2 on ``shapes_root`` for ``epochs`` epochs (seed 0) and save its checkpoint in ``out``."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from datamodules.datamodule import CaptionDataModule
    from modules.captioning import CaptioningModule

    L.seed_everything(0)
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=32, progress=False)
    dm.setup("fit")
    module = CaptioningModule.with_tokenizer(dm.tokenizer, image_size=32, lr=3e-3, warmup_steps=5, max_new_tokens=24)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=CSVLogger(str(out)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
    )
    trainer.fit(module, datamodule=dm)
    path = out / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def trained_checkpoint(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT-GPT2 trained for a few epochs on ``shapes_root`` (enough to produce non-trivial captions)."""
    return _train_tiny(shapes_root, tmp_path_factory.mktemp("trained"), epochs=4)


@pytest.fixture(scope="session")
def distinct_checkpoint(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT-GPT2 trained for 12 epochs (~20 s): unlike ``trained_checkpoint``, whose captions of the test
    images are all alike, it tells the test images apart, so an attack or an evaluation that mixes images up shows."""
    return _train_tiny(shapes_root, tmp_path_factory.mktemp("distinct"), epochs=12)
