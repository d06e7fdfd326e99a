"""Model registry. A model is built from (spec, number of features, number of classes).

Registry models avoid BatchNorm and Dropout on purpose: both make a replica's result depend on its
local batch or its own RNG, which would break invariant 2 (the parameters after K steps must not
depend on how many workers a partner had or how its samples were split).

A user model is named `package.module:function`; it is called as
`function(in_features=..., num_classes=..., **kwargs)` and must return a torch.nn.Module that maps
a float32 [batch, in_features] tensor to [batch, num_classes] logits.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def mlp(in_features: int, num_classes: int, hidden: Sequence[int] = (128, 64)) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def linear(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes)


class SmallCNN(nn.Module):
    """Two conv layers over a square single-channel image stored as flat features (digits: 8x8)."""

    def __init__(self, in_features: int, num_classes: int, channels: Sequence[int] = (16, 32),
                 side: int | None = None) -> None:
        super().__init__()
        side = side or math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(
                f"cnn needs a square image: {in_features} features is not side*side "
                "(set model.kwargs.side)"
            )
        self.side = side
        c1, c2 = (int(c) for c in channels)
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(c2 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


REGISTRY: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "linear": linear, "cnn": SmallCNN}


def resolve(name: str) -> Callable[..., nn.Module]:
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, _, fn_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model '{name}': cannot import module '{module_name}': {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model '{name}': '{module_name}' has no callable '{fn_name}'")
    return fn


def build_model(name: str, kwargs: dict, in_features: int, num_classes: int,
                seed: int) -> nn.Module:
    """Same (name, kwargs, shapes, seed) gives the same initial parameters in every process."""
    torch.manual_seed(seed)
    model = resolve(name)(in_features=in_features, num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
