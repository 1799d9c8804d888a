"""Vision models: a tiny random ViT and a tiny random convolutional net for tests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.models import LoadedModel, register_model, tiny


@register_model("tiny-vit", "vision", "ViT image classifier, random init from a small config (tests)")
def tiny_vit(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        num_labels=num_labels,
    )
    return tiny(cfg, num_labels, lambda: ViTForImageClassification(config), None, "vision")


class SamePadConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding, computed in its own forward from the input size (as
    EfficientNet-Lite's ported convolutions do): adapters must run it through its own forward, not `F.conv2d` with
    `self.padding`, which is 0 here."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TinyConvNet(nn.Module):
    """An inverted-residual (MobileNetV2 / EfficientNet-style) classifier with every kind of convolution adapters meet:
    a "same"-padded k×k stem, 1×1 expand and project convolutions, a depthwise 3×3, a 1×1 head convolution, and a
    linear classifier. Returns what Hugging Face classifiers return (`.loss`, `.logits`)."""

    def __init__(self, num_labels: int, num_channels: int, image_size: int, width: int = 8, expand: int = 2):
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels, num_channels=num_channels, image_size=image_size)
        hidden = width * expand
        self.stem = SamePadConv2d(num_channels, width, 3, stride=2, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, width, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(width)
        self.head_conv = nn.Conv2d(width, 2 * width, 1)
        self.classifier = nn.Linear(2 * width, num_labels)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> SimpleNamespace:
        x = F.relu6(self.stem_bn(self.stem(pixel_values)))
        h = F.relu6(self.expand_bn(self.expand(x)))
        h = F.relu6(self.depthwise_bn(self.depthwise(h)))
        x = x + self.project_bn(self.project(h))
        x = F.relu6(self.head_conv(x)).mean(dim=(2, 3))
        logits = self.classifier(x)
        loss = None
        if labels is not None:
            loss = (
                F.mse_loss(logits.squeeze(-1), labels.float())
                if logits.shape[-1] == 1
                else F.cross_entropy(logits, labels)
            )
        return SimpleNamespace(loss=loss, logits=logits)


@register_model("tiny-cnn", "vision", "inverted-residual conv net, random init (tests of adapters on convolutions)")
def tiny_cnn(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    return tiny(
        cfg,
        num_labels,
        lambda: TinyConvNet(num_labels, cfg.num_channels, cfg.image_size, cfg.width, cfg.expand),
        None,
        "vision",
    )
