"""DeiT's hard-label distillation (Touvron et al., 2021): a second output learns the teacher's decision.

    loss = (1 - alpha) * base + alpha * CE(dist_logits, argmax teacher_logits)

`base` is the student's usual class loss on its class output (for DeiT, CE against the mixed, smoothed labels); the
distillation output (DeiT: a distillation token with its own head) is trained on the teacher's argmax with plain
cross-entropy (no smoothing), the teacher seeing the same augmented, mixed image. DeiT uses alpha = 0.5; at inference
the two outputs are averaged.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class HardDistillationLoss(nn.Module):
    """forward(base (scalar), dist_logits (B, K), teacher_logits (B, K)) -> (loss, distillation term (detached)).

    Args:
        alpha: weight of the distillation term; the base loss gets 1 - alpha (DeiT: 0.5).
    """

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = alpha

    def forward(self, base: Tensor, dist_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        target = teacher_logits.detach().argmax(dim=-1)
        dist = F.cross_entropy(dist_logits.float(), target)
        return (1.0 - self.alpha) * base + self.alpha * dist, dist.detach()
