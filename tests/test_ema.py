"""callbacks/ema.py: the warm-up decay, tied parameters, and what a Trainer run writes into the checkpoint."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks.ema import EMA, ema_avg_fn


def test_warmup_decay():
    update = ema_avg_fn(0.99, warmup=True)
    ema, cur = torch.zeros(3), torch.ones(3)
    # after t updates the decay is min(0.99, (1 + t) / (10 + t)): 0.1 at t = 0
    torch.testing.assert_close(update(ema, cur, torch.tensor(0)), torch.full((3,), 0.9))
    torch.testing.assert_close(update(ema, cur, torch.tensor(10_000)), torch.full((3,), 0.01))
    torch.testing.assert_close(ema_avg_fn(0.5, warmup=False)(ema, cur, torch.tensor(0)), torch.full((3,), 0.5))


class Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        self.seen_raw = []

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, i):
        ema = next(c for c in self.trainer.callbacks if isinstance(c, EMA))
        raw = ema.raw_module()
        self.seen_raw.append(None if raw is None else raw.net[0].weight.detach().clone())
        self.log("val/loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def configure_callbacks(self):
        return [EMA(decay=0.9)]


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def test_trainer_run_saves_ema_and_raw_weights(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
    trainer.fit(model, loader(), loader())
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    # raw weights were available during validation, and differ from the EMA weights swapped in
    assert model.seen_raw and all(w is not None for w in model.seen_raw)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)  # written in on_train_end
    raw, avg = ckpt["current_model_state"], ckpt["state_dict"]
    # after fit the module holds the EMA weights and the raw ones stay available
    torch.testing.assert_close(model.net[0].weight.detach(), avg["net.0.weight"])
    torch.testing.assert_close(ema.raw_module().net[0].weight.detach(), raw["net.0.weight"])
    assert set(raw) == set(avg)
    assert not torch.allclose(raw["net.0.weight"], avg["net.0.weight"])
    # BN statistics are averaged too
    torch.testing.assert_close(avg["net.1.running_mean"], model.net[1].running_mean)
    assert not torch.allclose(avg["net.1.running_mean"], raw["net.1.running_mean"])


def test_tied_parameters_are_swapped_once():
    class Tied(L.LightningModule):
        def __init__(self):
            super().__init__()
            t = torch.zeros(3)
            self.a, self.b = nn.Parameter(t), nn.Parameter(t)  # two Parameters, one storage

    cur = Tied()
    ema = EMA(decay=0.9)
    ema.setup(None, cur, "fit")
    with torch.no_grad():
        ema._average_model.module.a.fill_(1.0)
    ema._swap_models(cur)
    assert cur.a.data_ptr() == cur.b.data_ptr()
    torch.testing.assert_close(cur.a.data, torch.ones(3))  # swapped, not swapped back by the twin Parameter
    torch.testing.assert_close(ema._average_model.module.a.data, torch.zeros(3))
