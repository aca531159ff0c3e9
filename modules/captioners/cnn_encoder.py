"""The Show-Attend-Tell image encoder: a torchvision ResNet trunk pooled to a fixed grid of annotation vectors.

Xu et al. (2015) attend over the ``L = grid × grid`` spatial positions of a CNN's last convolutional map. The trunk is
a torchvision ResNet without its ``avgpool`` and ``fc`` (ResNet-101 in Li et al.'s (2022) victim), or, for tiny
images, a small ResNet made of torchvision's own :class:`~torchvision.models.resnet.BasicBlock` (see
:func:`tiny_resnet_trunk`).
Submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ...), so a torchvision state_dict loads as is.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchvision.models import resnet

from datamodules.errors import RobucapError

# Constructors only: weights are never downloaded (``weights=None``); pretrained ones come from a local file.
TORCHVISION_RESNETS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
}
TINY_BACKBONE = "tiny_resnet"
BACKBONES = (TINY_BACKBONE, *TORCHVISION_RESNETS)
# The classifier head of a full torchvision state_dict; the trunk has no use for it.
CLASSIFIER_PREFIX = "fc."
# What loading a corrupt or foreign file raises, as observed on truncated, empty, text, image and random files: the
# zip reader's RuntimeError; for a file that is not a zip archive torch falls back to its legacy format, and Python's
# unpickler reading arbitrary bytes raises UnpicklingError, EOFError, KeyError, IndexError or UnicodeDecodeError;
# safetensors raises SafetensorError. Anything else is not the file's fault and is not relabelled.
_UNREADABLE: tuple[type[BaseException], ...] = (
    RuntimeError,
    OSError,
    EOFError,
    KeyError,
    IndexError,
    UnicodeDecodeError,
    pickle.UnpicklingError,
    SafetensorError,
)


def torchvision_resnet_trunk(name: str) -> tuple[nn.Sequential, int, int]:
    """A randomly initialised torchvision ResNet without ``avgpool`` and ``fc``.

    Args:
        name: One of :data:`TORCHVISION_RESNETS`.

    Returns:
        ``(trunk, channels, stride)``: the trunk, its output channels and its total stride (32).
    """
    model = TORCHVISION_RESNETS[name](weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    trunk = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))
    return trunk, model.fc.in_features, 32


def tiny_resnet_trunk(widths: Sequence[int], blocks: Sequence[int]) -> tuple[nn.Sequential, int, int]:
    """A small ResNet for 32–64 px images, built from torchvision's ``BasicBlock``.

    torchvision's ``ResNet`` class fixes the widths at 64–512 and opens with a 7×7 stride-2 convolution and a max
    pool, which at 32 px throws away three quarters of the pixels before any residual block and costs more than the
    whole tiny ViT-GPT2. This trunk keeps torchvision's blocks and initialisation but (1) opens with a 3×3 stride-1
    convolution, so single-pixel texture (the faint Gaussian-noise trigger of Li et al. 2022) reaches the first features
    at full resolution, and (2) uses narrow stages: stage ``i`` has ``widths[i]`` channels, ``blocks[i]`` blocks and
    stride 2, so the total stride is ``2 ** len(widths)``.

    Args:
        widths: Channels of the stem (= ``widths[0]``) and of each stage.
        blocks: Number of ``BasicBlock`` per stage; same length as ``widths``.

    Returns:
        ``(trunk, channels, stride)``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False),
        bn1=nn.BatchNorm2d(widths[0]),
        relu=nn.ReLU(inplace=True),
    )
    in_channels = widths[0]
    for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        downsample = nn.Sequential(resnet.conv1x1(in_channels, width, stride=2), nn.BatchNorm2d(width))
        stage = [resnet.BasicBlock(in_channels, width, stride=2, downsample=downsample)]
        stage += [resnet.BasicBlock(width, width) for _ in range(count - 1)]
        layers[f"layer{i + 1}"] = nn.Sequential(*stage)
        in_channels = width
    trunk = nn.Sequential(layers)
    # torchvision.models.resnet.ResNet's initialisation, so both kinds of trunk start alike.
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return trunk, in_channels, 2 ** len(widths)


class _ToChannelsLast(torch.autograd.Function):
    """``images.contiguous(memory_format=torch.channels_last)`` whose gradient comes back in the standard layout.

    oneDNN (CPU) and cuDNN run small convolutions much faster on channels-last tensors (a 30–40 % shorter training
    step of the tiny preset on one CPU thread), but attacks take the gradient with respect to the images and should
    not receive a tensor with unusual strides.
    """

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class CNNEncoder(nn.Module):
    """CNN trunk followed by adaptive average pooling to a fixed attention grid.

    Args:
        trunk: Convolutional layers on normalised images.
        channels: Output channels of ``trunk`` (the annotation-vector size ``D``).
        grid_size: Side of the attention grid; ``L = grid_size ** 2`` annotation vectors per image.
        backbone: Name of the trunk's architecture (for error messages).

    Shape:
        ``(B, 3, H, W)`` normalised images in, ``(B, L, D)`` annotation vectors out.
    """

    def __init__(self, trunk: nn.Sequential, channels: int, grid_size: int, backbone: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        self.channels = channels
        self.grid_size = grid_size
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.trunk(_ToChannelsLast.apply(images)))
        return features.flatten(2).transpose(1, 2)

    def load_trunk_weights(self, path: str | Path) -> None:
        """Load a local state_dict of the trunk's architecture (``fc.*`` keys of a classifier are ignored).

        Args:
            path: A ``torch.save``'d state_dict (read with ``weights_only=True``) or a ``.safetensors`` file.

        Raises:
            RobucapError: The file is missing, unreadable, not a state_dict, or does not fit the trunk.
        """
        path = Path(path)
        if self.backbone in TORCHVISION_RESNETS:
            kind = f"a torchvision {self.backbone}"
        else:
            kind = f"this preset's {self.backbone} trunk"
        hint = f"it must hold the state_dict of {kind} (fc.* keys are ignored)"
        if not path.is_file():
            raise RobucapError(f"encoder_weights file {path} does not exist; {hint}")
        try:
            if path.suffix == ".safetensors":
                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except _UNREADABLE as err:
            # torch's own message is many lines long and suggests weights_only=False, which we never do.
            raise RobucapError(
                f"cannot read encoder_weights file {path} as a torch.save'd state_dict or a .safetensors file "
                f"({type(err).__name__}); {hint}"
            ) from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RobucapError(f"encoder_weights file {path} is not a state_dict of tensors; {hint}")
        state = {k: v for k, v in state.items() if not str(k).startswith(CLASSIFIER_PREFIX)}
        expected = self.trunk.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or mismatched:
            found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
            problems = [f"{len(items)} {what} (first: {items[0]})" for what, items in found.items() if items]
            raise RobucapError(f"encoder_weights file {path} does not fit: {'; '.join(problems)}; {hint}")
        self.trunk.load_state_dict(state)
