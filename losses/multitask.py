"""Joint age-regression + gender-classification loss."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class AgeGenderLoss(nn.Module):
    """`gender_weight * BCE(gender) + age_weight * L(age / max_age)`, L = L1 or smooth-L1.

    Ages are compared after dividing by `max_age`, so both terms are of order one (the published recipe: L1 on age/116
    plus BCE, 1:1). `beta` is smooth-L1's quadratic zone in years; errors beyond it are penalised linearly as L1 does.

    forward(age_pred, gender_logit, age, gender): all (B,); ages in years, gender 0 male / 1 female (float).
    Returns a dict of scalars: `loss` (the weighted sum), `age` and `gender` (the unweighted terms).
    """

    def __init__(self, age_loss: Literal["l1", "smooth_l1"] = "smooth_l1", age_weight: float = 1.0,
                 gender_weight: float = 1.0, max_age: float = 116.0, beta: float = 2.0):
        super().__init__()
        if age_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"age_loss must be 'l1' or 'smooth_l1', got {age_loss!r}")
        self.age_loss, self.age_weight, self.gender_weight = age_loss, age_weight, gender_weight
        self.max_age, self.beta = float(max_age), float(beta)

    def forward(self, age_pred: torch.Tensor, gender_logit: torch.Tensor, age: torch.Tensor,
                gender: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, target = age_pred / self.max_age, age.to(age_pred.dtype) / self.max_age
        if self.age_loss == "l1":
            age_term = F.l1_loss(pred, target)
        else:
            age_term = F.smooth_l1_loss(pred, target, beta=self.beta / self.max_age)
        gender_term = F.binary_cross_entropy_with_logits(gender_logit, gender.to(gender_logit.dtype))
        loss = self.age_weight * age_term + self.gender_weight * gender_term
        return {"loss": loss, "age": age_term.detach(), "gender": gender_term.detach()}
