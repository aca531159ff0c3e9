"""The README's "Your own data" walk-through, command by command, on a Flickr8k download this test writes.

The commands are read from the README itself (the first ``bash`` block under "## Your own data"), so the text a
new user follows is the text that is tested. Only paths and run length change: the dataset, run and export
directories move under ``tmp_path``, images shrink to 32 px and training to one short epoch.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from helpers.fake_datasets import tree_digest
from helpers.messy_flickr8k import write_messy_flickr8k

from lightning_app.cli import main

REPO = Path(__file__).resolve().parents[1]
_FAST = {
    "fit": ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--data.batch_size", "8"],
    "test": ["--data.batch_size", "8"],
    "predict": ["--data.batch_size", "8"],
}
_QUIET = ["--data.progress", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
          "false"]  # fmt: skip


def readme_commands() -> list[str]:
    """Command lines of the "Your own data" section's first bash block (continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's 'Your own data' section has no bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [line.split(" #", 1)[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_walkthrough_on_a_flickr8k_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fit, test, predict, attack and export as the README says, on Flickr8k's native layout
    with real-world captions (hyphens, accents, an emoji) and photos (EXIF-rotated, grayscale, CMYK, RGBA)."""
    monkeypatch.chdir(tmp_path)
    names = write_messy_flickr8k(tmp_path / "data" / "flickr8k")
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for name in names["test"][:3]:
        (photos / name).write_bytes((tmp_path / "data/flickr8k/Flicker8k_Dataset" / name).read_bytes())
    before = {folder: tree_digest(tmp_path / folder) for folder in ("data", "my_photos")}
    commands = readme_commands()
    assert [c.split()[0] if "=" not in c.split()[0] else "VAR" for c in commands][:1] == ["robucap"]
    ran: list[str] = []
    variables: dict[str, str] = {}
    for line in commands:
        assignment = re.fullmatch(r"(\w+)=\$\(ls -t (\S+) \| head -1\)", line)
        if assignment:
            (match,) = sorted(tmp_path.glob(assignment.group(2)), key=lambda p: p.stat().st_mtime)[-1:]
            variables[assignment.group(1)] = str(match)
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        argv = shlex.split(line)
        assert argv[0] == "robucap", line
        command = argv[1]
        argv = [REPO / a if a.startswith("configs/") else a for a in argv[2:]]
        argv = [str(a) for a in argv]
        argv = ["32" if prev == "--data.image_size" else a for prev, a in zip([None, *argv], argv, strict=False)]
        if command in _FAST:
            argv += _FAST[command] + _QUIET
        assert main([command, *argv]) == 0, line
        ran.append(command)
    assert ran == ["fit", "test", "predict", "predict", "attack", "export"]
    # No command wrote into the dataset or the photo folder.
    assert {folder: tree_digest(tmp_path / folder) for folder in before} == before

    runs = tmp_path / "runs" / "flickr8k"
    predictions = sorted(runs.rglob("predictions.jsonl"), key=lambda p: p.stat().st_mtime)
    test_rows, split_rows, photo_rows = ([json.loads(x) for x in p.read_text().splitlines()] for p in predictions)
    assert len(test_rows) == 6 and all(r["references"] for r in test_rows)
    assert len(split_rows) == 6 and {r["image_id"] for r in split_rows} == set(names["test"])
    assert sorted(r["image_id"] for r in photo_rows) == sorted(names["test"][:3])
    assert (runs / "fgsm" / "results.json").is_file()
    assert (tmp_path / "exported" / "flickr8k" / "model.safetensors").is_file()
