"""torchmetrics for age / gender estimation: gender accuracy and F1, age MAE in years, overall and per age decade."""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score
from torchmetrics.regression import MeanAbsoluteError


class DecadeMAE(Metric):
    """Mean absolute age error in years per decade of the true age (decade d = ages 10d .. 10d+9).

    update(age_pred, age) with (B,) tensors in years; compute() -> (num_decades,) tensor, NaN for decades not seen.
    """

    full_state_update = False

    def __init__(self, num_decades: int = 12, **kwargs):
        super().__init__(**kwargs)
        self.num_decades = num_decades
        self.add_state("abs_error", default=torch.zeros(num_decades), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_decades), dist_reduce_fx="sum")

    def update(self, age_pred: torch.Tensor, age: torch.Tensor) -> None:
        decade = (age.detach() // 10).long().clamp(0, self.num_decades - 1)
        error = (age_pred.detach().float() - age.detach().float()).abs()
        self.abs_error.index_add_(0, decade, error)
        self.count.index_add_(0, decade, torch.ones_like(error))

    def compute(self) -> torch.Tensor:
        return self.abs_error / self.count  # 0 / 0 = NaN marks an empty decade


class AgeGenderMetrics(nn.Module):
    """All metrics of one split; `compute()` -> {"age_mae": .., "gender_acc": .., "gender_f1": .., "age_mae_decade_2": ..}.

    update(age_pred, gender_logit, age, gender): (B,) tensors; ages in years, gender 1 = female.
    """

    def __init__(self, max_age: float = 116.0):
        super().__init__()
        self.age_mae = MeanAbsoluteError()
        self.gender_acc = BinaryAccuracy()
        self.gender_f1 = BinaryF1Score()
        self.decade_mae = DecadeMAE(num_decades=int(max_age // 10) + 1)

    def update(self, age_pred, gender_logit, age, gender) -> None:
        self.age_mae.update(age_pred, age)
        p_female, target = torch.sigmoid(gender_logit), gender.long()
        self.gender_acc.update(p_female, target)
        self.gender_f1.update(p_female, target)
        self.decade_mae.update(age_pred, age)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"age_mae": self.age_mae.compute(), "gender_acc": self.gender_acc.compute(),
               "gender_f1": self.gender_f1.compute()}
        for decade, value in enumerate(self.decade_mae.compute()):
            if not torch.isnan(value):
                out[f"age_mae_decade_{decade}"] = value.float()
        return out

    def reset(self) -> None:
        for metric in (self.age_mae, self.gender_acc, self.gender_f1, self.decade_mae):
            metric.reset()
