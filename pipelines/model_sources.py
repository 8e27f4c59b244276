"""Where models that are not in hycomp's registry come from: torchvision classification builders (fitted
to the dataset's channels and classes, with a small-image stem when asked) and a user's own callable."""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from pipelines.errors import ConfigError

__all__ = ["TORCHVISION_BUILDERS", "torchvision_model", "user_model"]

# torchvision classification builders whose stem we know how to adapt, by family.
TORCHVISION_BUILDERS: dict[str, str] = {
    **{
        name: "resnet"
        for name in (
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "resnext50_32x4d",
            "resnext101_32x8d",
            "resnext101_64x4d",
            "wide_resnet50_2",
            "wide_resnet101_2",
        )
    },
    **{
        name: "vgg"
        for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
    },
    "mobilenet_v2": "mobilenet",
    "mobilenet_v3_small": "mobilenet",
    "mobilenet_v3_large": "mobilenet",
    **{f"efficientnet_b{index}": "mobilenet" for index in range(8)},
    **{f"efficientnet_v2_{size}": "mobilenet" for size in ("s", "m", "l")},
}


def _replace_conv(conv: nn.Conv2d, in_channels: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    """A fresh conv with ``conv``'s output channels and bias, He-initialised like torchvision's stems."""
    replacement = nn.Conv2d(
        in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None
    )
    nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    if replacement.bias is not None:
        nn.init.zeros_(replacement.bias)
    return replacement


def torchvision_model(
    builder: str, kwargs: dict, small: bool, in_channels: int, num_classes: int
) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(builder, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ConfigError(
            f"model.kwargs: {kwargs!r} is not accepted by torchvision's {builder} ({error}). "
            "Remove or rename the keyword."
        ) from error
    family = TORCHVISION_BUILDERS[builder]
    if family == "resnet":
        stem = model.conv1
        if small:
            model.conv1 = _replace_conv(stem, in_channels, 3, 1, 1)
            model.maxpool = nn.Identity()
        elif in_channels != stem.in_channels:
            model.conv1 = _replace_conv(stem, in_channels, 7, 2, 3)
    elif family == "vgg":
        stem = model.features[0]
        if in_channels != stem.in_channels:
            model.features[0] = _replace_conv(stem, in_channels, 3, 1, 1)
        if small:
            # Five 2x2 pools take 28 px to nothing: drop the last one, pool globally and give the
            # classifier 512-wide hidden layers (the CIFAR VGG head) instead of 4096 on a 7x7 map.
            pools = [index for index, layer in enumerate(model.features) if isinstance(layer, nn.MaxPool2d)]
            model.features[pools[-1]] = nn.Identity()
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            channels = model.classifier[0].in_features // 49
            model.classifier[0] = nn.Linear(channels, 512)
            model.classifier[3] = nn.Linear(512, 512)
            model.classifier[6] = nn.Linear(512, num_classes)
            for layer in (model.classifier[0], model.classifier[3], model.classifier[6]):
                nn.init.normal_(layer.weight, 0, 0.01)
                nn.init.zeros_(layer.bias)
    else:  # MobileNetV2/V3 and EfficientNet: features[0][0] is the stem conv
        stem = model.features[0][0]
        stride = 1 if small else stem.stride[0]
        if small or in_channels != stem.in_channels:
            model.features[0][0] = _replace_conv(
                stem, in_channels, stem.kernel_size[0], stride, stem.padding[0]
            )
    return model


def user_model(arch: str, kwargs: dict, in_channels: int, num_classes: int) -> nn.Module:
    module_name, _, attribute = arch.rpartition(":")
    working_directory = os.getcwd()
    if working_directory not in sys.path:
        sys.path.insert(0, working_directory)  # the user's code lives beside their study, not installed
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(
            f"model.arch: {arch!r}: cannot import {module_name!r} ({type(error).__name__}: {error}). "
            f"Run from the folder that holds it (working directory {working_directory}) or install it."
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(
            f"model.arch: {arch!r}: module {module_name!r} has no callable {attribute!r}. "
            "Name a function or nn.Module class defined in it."
        )
    arguments = dict(kwargs)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass only the kwargs
        parameters = {}
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if (name in parameters or takes_any) and name not in arguments:
            arguments[name] = value
    try:
        model = factory(**arguments)
    except TypeError as error:
        raise ConfigError(
            f"model.kwargs: {arch!r} rejected the arguments {sorted(arguments)} ({error}). "
            "Fix model.kwargs to match its signature."
        ) from error
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.arch: {arch!r} returned {type(model).__name__}, not a torch nn.Module. "
            "Point it at a function or class that returns the network."
        )
    return model
