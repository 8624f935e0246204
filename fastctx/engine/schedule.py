"""Learning-rate schedule per iteration: mmengine's LinearLR warmup followed by its PolyLR."""
from __future__ import annotations

import torch


class PolyLR:
    """The learning rate of iteration t (0-based), as mmseg 1.x configs schedule it.

    Warmup, t < warmup_iters: mmengine `LinearLR(start_factor=warmup_ratio,
    begin=0, end=warmup_iters)`: lr0 * (r + (1 - r) * t / (warmup_iters - 1)).
    Then mmengine `PolyLR(eta_min, power, begin=warmup_iters, end=total_iters)`:
    with s = t - warmup_iters and S = total_iters - warmup_iters - 1,
    (lr0 - eta_min) * (1 - s / S) ** power + eta_min, so the last iteration
    runs at eta_min. The value is a closed form of t, so resuming needs no
    scheduler state beyond the iteration.
    """

    def __init__(self, base_lr: float, total_iters: int, power: float = 0.9, eta_min: float = 1e-4,
                 warmup_iters: int = 0, warmup_ratio: float = 1e-6):
        if total_iters < 1:
            raise ValueError(f"total_iters must be >= 1, got {total_iters}")
        if warmup_iters < 0 or (warmup_iters and warmup_iters >= total_iters):
            raise ValueError(f"warmup_iters must be in [0, total_iters={total_iters}), got {warmup_iters}")
        self.base_lr, self.total_iters, self.power, self.eta_min = base_lr, total_iters, power, eta_min
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def lr_at(self, iteration: int) -> float:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if iteration < self.warmup_iters:
            if self.warmup_iters == 1:
                return self.base_lr * self.warmup_ratio
            progress = iteration / (self.warmup_iters - 1)
            return self.base_lr * (self.warmup_ratio + (1.0 - self.warmup_ratio) * progress)
        step = iteration - self.warmup_iters
        span = self.total_iters - self.warmup_iters - 1
        if span <= 0 or step == 0:
            return self.base_lr if step == 0 else self.eta_min
        remaining = max(1.0 - step / span, 0.0)
        return (self.base_lr - self.eta_min) * remaining ** self.power + self.eta_min

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set every parameter group's lr for `iteration` (times the group's "lr_mult", default 1); returns it."""
        lr = self.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return dict(base_lr=self.base_lr, total_iters=self.total_iters, power=self.power, eta_min=self.eta_min,
                    warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown PolyLR state key {key!r}")
            setattr(self, key, value)
