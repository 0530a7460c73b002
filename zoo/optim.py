"""Optimizers (torch / lion-pytorch) with weight-decay parameter groups, and timm's warm-up + decay schedules."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.errors import unknown

# Parameters that are never decayed when `no_decay_on_norm_bias` is on (besides every 0/1-D tensor: norms, biases,
# Mamba-2's A_log / D / dt_bias). mamba-ssm marks A_log and D with `_no_weight_decay`; we honour that too.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "A_log", "A_logs", "A_b_log", "Ds", "D_b", "dt_bias", "dt_projs_bias")


def param_groups(model: nn.Module, weight_decay: float, exclude_no_decay: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    With `exclude_no_decay` False every parameter is decayed (DeMansia 2's published recipe).
    """
    if not exclude_no_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    extra = set()
    for module in model.modules():
        if hasattr(module, "no_weight_decay"):  # timm convention: a set of parameter names relative to the module
            extra |= {n.split(".")[-1] for n in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or leaf in NO_DECAY_NAMES or leaf in extra:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """Optimizer named by `cfg.optimizer` over `param_groups(model, ...)`. Lion comes from lion-pytorch."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_on_norm_bias)
    name = cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "adam":  # L2-coupled decay, as torch.optim.Adam does it
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], nesterov=True)
    raise unknown("optimizer", name, ["adamw", "adam", "lion", "sgd"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, updates_per_epoch: int, epochs: int | None = None):
    """timm scheduler (linear warm-up from `warmup_lr`, then cosine to `min_lr` / step decay / constant); with
    `cfg.decay_milestones` (epochs, a config field of the tasks that have it) the lr is multiplied by `decay_rate` at
    each milestone instead, after the warm-up.

    Stepped per optimizer update (`sched_interval="step"`) or per epoch; see `ZooModule.lr_scheduler_step`.
    """
    from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2

    milestones = getattr(cfg, "decay_milestones", ())
    if milestones:
        per_epoch = cfg.sched_interval == "epoch"
        steps = 1 if per_epoch else max(1, updates_per_epoch)
        # timm applies milestone m at t == m - 1 (its historical convention): +1 makes the lr change at epoch m.
        return MultiStepLRScheduler(optimizer, decay_t=[int(m * steps) + 1 for m in milestones],
                                    decay_rate=cfg.decay_rate, warmup_t=int(cfg.warmup_epochs * steps),
                                    warmup_lr_init=cfg.warmup_lr, warmup_prefix=False, t_in_epochs=per_epoch)

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.scheduler,
        num_epochs=epochs or cfg.epochs,
        decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=cfg.sched_interval == "epoch",
        updates_per_epoch=max(1, updates_per_epoch),
    )
    return scheduler
