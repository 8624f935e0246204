"""Whole-model rows: one training iteration and one inference of APCNet / EncNet, fused vs not.

A training iteration is ``model.loss(img, label)`` (decode + auxiliary (+ SE) losses), the
backward of their sum and an SGD step (momentum 0.9, weight decay 5e-4, as mmseg's
schedules); inference is ``model(img)`` in eval mode under ``torch.no_grad``. Providers:
``eager`` runs the decode head's reference maths (``model.fused = False``), ``fastctx-<b>``
its fused ops on backend b; the backbone and the rest are the same PyTorch code in both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import fastctx

from .providers import fastctx_providers, provider_unavailable_reason

DEFAULT_MODELS = ("apcnet_r50-d8", "encnet_r50-d8")
MODEL_MODES = ("train", "infer")


def _build_model_fn():
    try:
        from fastctx.models import build_model
    except ImportError as exc:
        raise RuntimeError(f"--models needs fastctx.models.build_model, which is not available here ({exc})") from exc
    return build_model


def _pool_norm(model: nn.Module) -> str | None:
    """Which part of `model` applies BatchNorm to each image's 1x1 global pool, or None."""
    from fastctx.nn.apc_head import ACM
    from fastctx.nn.aspp_head import ASPPHead
    from fastctx.nn.uper_head import PPM

    for module in model.modules():
        if isinstance(module, ACM):
            return "the ACM's"
        if isinstance(module, ASPPHead):  # ASPP's image pool (ACFNet's base too)
            return "the ASPP image pool's"
        if isinstance(module, PPM) and 1 in module.pool_scales:  # UPerHead's pyramid pooling
            return "the PPM's scale-1"
    return None


def model_batch(name: str, model: nn.Module, mode: str, batch: int | None) -> int:
    """The batch to run `model` (named `name`) at in `mode`: `batch`, or with None the smallest it
    runs, 1, or 2 to train a model with an ACM, an ASPP image pool or a PPM with a scale-1 pool. ValueError if
    `batch` is below that.

    All apply BatchNorm to each image's 1x1 global pool; in training mode BatchNorm
    needs more than one value per channel, so one image cannot train (in mmseg too).
    """
    if batch is not None and batch < 1:
        raise ValueError(f"--model-batch {batch}: must be >= 1")
    pool_norm = _pool_norm(model) if mode == "train" else None
    smallest = 2 if pool_norm is not None else 1
    if batch is None:
        return smallest
    if batch < smallest:
        raise ValueError(f"--model-batch {batch}: training {name} needs at least {smallest} images (BatchNorm in "
                         f"training mode over {pool_norm} [B, C, 1, 1] global pool needs more than one value per "
                         "channel)")
    return batch


def check_model_batch(name: str, batch: int | None) -> None:
    """ValueError unless model `name` exists and can run every mode at `batch` (None: its smallest)."""
    build_model = _build_model_fn()
    with torch.device("meta"):  # the architecture only: no memory, no initialisation arithmetic
        model = build_model(name, 19)
    for mode in MODEL_MODES:
        model_batch(name, model, mode, batch)


def model_providers(device: torch.device) -> list[str]:
    return ["eager"] + fastctx_providers(device)


@dataclass
class ModelInstance:
    """One model at one input size in one mode, with its inputs, optimizer and providers."""

    op: str
    shape: str
    mode: str
    device: torch.device
    model: nn.Module
    img: torch.Tensor
    label: torch.Tensor
    optimizer: torch.optim.Optimizer
    providers: dict[str, tuple[bool, str | None]] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self, provider: str):
        """One inference (mode "infer") or one training iteration (mode "train") of `provider`."""
        fused, backend = self.providers[provider]
        self.model.fused = fused
        with fastctx.use_backend(backend):
            if self.mode == "infer":
                with torch.no_grad():
                    return self.model(self.img)
            self.optimizer.zero_grad(set_to_none=True)
            losses = self.model.loss(self.img, self.label)
            total = sum(losses.values())
            total.backward()
            self.optimizer.step()
            return None

    def lower_bound_bytes(self) -> None:
        """Whole models are timed and measured, not traffic-modelled."""
        return None


def build_model_instance(name: str, mode: str, providers: Sequence[str], device: torch.device | str = "cpu",
                         size: int = 512, batch: int | None = None, num_classes: int = 19,
                         seed: int = 0) -> ModelInstance:
    """Model `name` (e.g. "apcnet_r50-d8") with a random batch of `batch` size x size images.

    `batch` None: the smallest batch the model runs in `mode` (see `model_batch`).
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"unknown model mode {mode!r}: expected one of {MODEL_MODES}")
    device = torch.device(device)
    table = {}
    for provider in providers:
        if provider == "eager":
            table[provider] = (False, None)
            continue
        if not provider.startswith("fastctx-"):
            raise ValueError(f"whole-model rows have providers eager and fastctx-<backend>, got {provider!r}")
        reason = provider_unavailable_reason(provider, device, torch.float32)
        if reason is not None:
            raise ValueError(f"provider {provider!r} cannot run {name} on {device}: {reason}")
        table[provider] = (True, provider.removeprefix("fastctx-"))
    build_model = _build_model_fn()
    torch.manual_seed(seed)
    model = build_model(name, num_classes, fused=True).to(device)
    model.train(mode == "train")
    batch = model_batch(name, model, mode, batch)
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, size, size, generator=gen).to(device)
    label = torch.randint(0, num_classes, (batch, size, size), generator=gen)
    label[torch.rand(batch, size, size, generator=gen) < 0.05] = 255  # some ignored pixels, as in real data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return ModelInstance(op=name, shape=f"{batch}x3x{size}x{size}", mode=mode, device=device, model=model, img=img,
                         label=label.to(device), optimizer=optimizer, providers=table)
