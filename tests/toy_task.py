"""A tiny task registered only in tests: exercises train.py, checkpoints and resume independently of the real tasks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.base import ZooDataModule
from model_config import BaseConfig, ModelEntry
from zoo.errors import ZooError
from zoo.module import ZooModule


@dataclass
class ToyConfig(BaseConfig):
    hidden: int = 16
    dropout: float = 0.2
    num_classes: int = 3
    epochs: int = 2
    batch_size: int = 8
    lr: float = 1e-2
    warmup_epochs: float = 0.0
    num_workers: int = 0
    monitor: str = "val/acc"
    monitor_mode: str = "max"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"micro": {}, "wide": {"hidden": 64}}
    DEFAULT_PRESET: ClassVar[str | None] = "micro"


class ToyDataset(torch.utils.data.Dataset):
    """Points of 3 Gaussian clusters; training items get random noise (draws from torch's global RNG)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, train: bool):
        self.x, self.y, self.train = x, y, train

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.train:
            x = x + 0.1 * torch.randn_like(x)
        return x, self.y[i]


class ToyDataModule(ZooDataModule):
    DEMO_NAME = "toy"
    LAYOUT_HELP = "a folder with data.npz (arrays x: (N, 4) float, y: (N,) int)."

    def make_demo(self, root: Path) -> None:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, 120)
        x = rng.normal(0, 0.5, (120, 4)) + np.eye(4)[y] * 2
        np.savez(root / "data.npz", x=x.astype(np.float32), y=y)

    def setup(self, stage: str | None = None) -> None:
        path = self.root / "data.npz"
        if not path.exists():
            raise ZooError(f"{path} not found. Expected {self.LAYOUT_HELP}")
        d = np.load(path)
        x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"]).long()
        self.train_set, self.val_set = ToyDataset(x[:96], y[:96], True), ToyDataset(x[96:], y[96:], False)

    def config_overrides(self) -> dict[str, Any]:
        return {"num_classes": 3}

    def train_dataloader(self):
        return self.loader(self.train_set, train=True)

    def val_dataloader(self):
        return self.loader(self.val_set, train=False)


class ToyModule(ZooModule):
    TASK = "toy"
    CONFIG = ToyConfig

    def __init__(self, config=None, task=None, **overrides):
        super().__init__(config, task, **overrides)
        c = self.cfg
        self.net = nn.Sequential(nn.Linear(4, c.hidden), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.hidden, c.num_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())


ENTRY = ModelEntry(name="toy", module="toy_task:ToyModule", datamodule="toy_task:ToyDataModule", config=ToyConfig,
                   summary="test-only toy classifier")
