"""`FaceEmbedder`: the LightningModule of the face task (metric losses, two-stage schedule, retrieval and LFW
verification, the calibrated same/different threshold)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from losses.metric import MetricLoss
from model_config import FaceConfig
from models.face.metrics import retrieval_metrics, verify_pairs
from models.face.model import FaceEmbeddingNet
from zoo.embedding import Embedder
from zoo.module import ZooModule
from zoo.verification import calibrate_threshold


def gather_rows(tensors: list[Tensor], all_gather, world_size: int) -> list[Tensor]:
    """Concatenate each rank's rows of every tensor in rank order (tensors: (N_rank, ...) on each rank, N_rank may
    differ): `all_gather(t)` stacks a same-shaped tensor from every rank into (world_size, ...). With contiguous
    per-rank shards (datamodules.samplers.RankShardSampler) the result is the single-process order. Returns CPU
    tensors; with world_size 1 the inputs unchanged."""
    if world_size <= 1:
        return list(tensors)
    counts = all_gather(torch.tensor([len(tensors[0])])).reshape(world_size).tolist()
    most = int(max(counts))
    out = []
    for t in tensors:
        pad = t.new_zeros((most - len(t), *t.shape[1:]))
        stacked = all_gather(torch.cat([t, pad])).reshape(world_size, most, *t.shape[1:]).cpu()
        out.append(torch.cat([stacked[r, :int(n)] for r, n in enumerate(counts)]))
    return out


def all_gather_stacked(t: Tensor) -> Tensor:
    """A same-shaped tensor from every rank stacked into (world_size, ...), with torch.distributed's own collective
    (LightningModule.all_gather goes through torch.distributed.nn.functional.all_gather, which torch deprecates;
    no gradient is needed here)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


class FaceEmbedder(Embedder, ZooModule):
    """Face-embedding LightningModule (task "face"): `model(images (B, 3, S, S)) -> (B, D)` unit embeddings.

    Training: `cfg.metric_loss` (triplet with a `cfg.miner`, ArcFace or CosFace; the loss is a submodule, so ArcFace /
    CosFace class weights are optimised too) on P x K batches. Two-stage schedule (upstream: "all" then "hard"
    triplets): with `cfg.stage2_miner` set and `cfg.stage2_epoch` > 0, at that epoch the miner is switched and a
    fresh optimiser and warm-up + cosine schedule over the remaining epochs are created; the current stage is a buffer,
    so a resumed run continues in the right stage. As published: `cfg.stage2_from_best` restarts stage 2 from the best
    stage-1 checkpoint (by `cfg.monitor`), and `cfg.early_stopping_patience` ends a stage after that many validations
    without a better monitor value (stage 1 then hands over to stage 2, which gets its full length).

    Validation (dataloader 0 = the val split): rank-1 (`val/rank1`, precision@1: upstream's "Recall@1"), R-Precision
    and MAP@R; the
    same/different cosine threshold calibrated on all val pairs (best balanced accuracy) is stored in the `threshold`
    buffer and so in every checkpoint. Dataloader 1, when the data has a pairs.txt: LFW k-fold verification accuracy
    and ROC AUC (val/verif_acc, val/verif_auc).
    """

    TASK = "face"
    CONFIG = FaceConfig

    def __init__(self, config=None, task=None, **overrides):
        super().__init__(config, task, **overrides)
        cfg = self.cfg
        self.net = FaceEmbeddingNet(cfg)
        self.criterion = MetricLoss(cfg.metric_loss, cfg.embedding_dim, cfg.num_identities, cfg.margin, cfg.scale,
                                    cfg.miner)
        self.register_buffer("threshold", torch.tensor(0.5))  # cosine similarity; upstream's fixed value until calibrated
        self.register_buffer("stage", torch.tensor(1))
        self.register_buffer("stage_start_step", torch.tensor(0))
        self.register_buffer("stage_start_epoch", torch.tensor(0))
        self.register_buffer("best_score", torch.tensor(0.0))  # early stopping, per stage (valid when has_best)
        self.register_buffer("has_best", torch.tensor(False))
        self.register_buffer("bad_epochs", torch.tensor(0))
        self._outputs: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def same_person(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine similarity of paired embeddings (N, D) x (N, D) -> (N,), and whether it reaches the threshold."""
        sim = (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)
        return sim, sim >= self.threshold.float().cpu().item()

    # ----- training -----
    def setup(self, stage: str) -> None:
        # `init_from` starts a new run only: a resumed run already holds its own trained weights.
        if stage == "fit" and self.cfg.init_from and self.starts_fresh:
            from models.backbones import init_from_checkpoint

            print(f"[face] {init_from_checkpoint(self.net.encoder, self.cfg.init_from)}")

    @property
    def two_stage(self) -> bool:
        return self.cfg.stage2_miner is not None and self.cfg.stage2_epoch > 0

    def on_fit_start(self) -> None:
        if int(self.stage) == 2:  # resumed in stage 2
            self.criterion.set_miner(self.cfg.stage2_miner)

    def _stage_stopped_early(self) -> bool:
        p = self.cfg.early_stopping_patience
        return p > 0 and int(self.bad_epochs) >= p

    def on_train_epoch_start(self) -> None:
        if self.two_stage and int(self.stage) == 1 and (self.current_epoch >= self.cfg.stage2_epoch
                                                        or self._stage_stopped_early()):
            why = "early stop" if self.current_epoch < self.cfg.stage2_epoch else "scheduled"
            if self.cfg.stage2_from_best:
                self._load_best_weights()
            self.stage.fill_(2)
            self.stage_start_step.fill_(self.global_step)
            self.stage_start_epoch.fill_(self.current_epoch)
            self.has_best.fill_(False)
            self.bad_epochs.zero_()
            self.criterion.set_miner(self.cfg.stage2_miner)
            self.trainer.strategy.setup_optimizers(self.trainer)  # calls configure_optimizers for stage 2
            print(f"[face] epoch {self.current_epoch}: stage 2 ({why}; miner '{self.cfg.stage2_miner}', "
                  f"fresh optimiser{', best stage-1 weights' if self.cfg.stage2_from_best else ''})")

    def _load_best_weights(self) -> None:
        """The network weights of the best checkpoint so far (stage 1), as upstream's stage 2 starts from it."""
        path = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if not path:
            print("[face] stage 2: no best checkpoint was written in stage 1; continuing from the current weights")
            return
        from zoo.checkpoint import read_checkpoint

        state = read_checkpoint(path)["state_dict"]
        keep = ("threshold", "stage", "stage_start_step", "stage_start_epoch", "best_score", "has_best", "bad_epochs")
        self.load_state_dict({k: v for k, v in state.items() if k not in keep}, strict=False)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.criterion(self(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def schedule_epochs(self) -> int:
        """The warm-up + cosine schedule spans the current stage only (see the class docs)."""
        max_epochs = self.max_epochs()
        if not self.two_stage:
            return max_epochs
        if int(self.stage) == 1:
            return min(self.cfg.stage2_epoch, max_epochs)
        return max(1, max_epochs - self.cfg.stage2_epoch)

    def lr_scheduler_step(self, scheduler, metric=None):
        if self.cfg.sched_interval == "epoch":
            scheduler.step(epoch=self.current_epoch + 1 - int(self.stage_start_epoch))
        else:
            scheduler.step_update(num_updates=self.global_step - int(self.stage_start_step))

    # ----- evaluation -----
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, labels = batch
        self._outputs[dataloader_idx].append((self(images).float().cpu(), labels.cpu()))

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        logged = self._evaluate("val", calibrate=not self.trainer.sanity_checking)
        if not self.trainer.sanity_checking:
            self._early_stopping(logged.get(self.cfg.monitor))

    def _early_stopping(self, value: float | None) -> None:
        """Per-stage patience on `cfg.monitor`; the last stage ends the run, stage 1 hands over to stage 2."""
        if self.cfg.early_stopping_patience <= 0 or value is None:
            return
        value = float(value)
        better = (value > float(self.best_score)) if self.cfg.monitor_mode == "max" else (value < float(self.best_score))
        if not bool(self.has_best) or better:
            self.best_score.fill_(value)
            self.has_best.fill_(True)
            self.bad_epochs.zero_()
        else:
            self.bad_epochs.add_(1)
        last_stage = not self.two_stage or int(self.stage) == 2
        if int(self.stage) == 2:  # stage 2 has its own length, however early stage 1 ended
            length = max(1, self.max_epochs() - self.cfg.stage2_epoch)
            if self.current_epoch + 1 >= int(self.stage_start_epoch) + length:
                self.trainer.should_stop = True
        if last_stage and self._stage_stopped_early():
            print(f"[face] early stopping at epoch {self.current_epoch}: {self.cfg.monitor} did not improve on "
                  f"{float(self.best_score):.4f} for {self.cfg.early_stopping_patience} validations")
            self.trainer.should_stop = True

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", calibrate=False)

    def _evaluate(self, prefix: str, calibrate: bool) -> dict[str, float]:
        """Logs and returns the split's metrics ({"val/rank1": ...}). Under DDP they come from the rows of
        every rank, so every rank logs the same value; `sync_dist=True` (Lightning's ask for epoch-level logs in a
        distributed run) averages equal values."""
        logged: dict[str, float] = {}
        outputs, self._outputs = self._outputs, defaultdict(list)
        if 0 in outputs:
            emb = torch.cat([e for e, _ in outputs[0]])
            labels = torch.cat([y for _, y in outputs[0]])
            emb, labels = self._gather(emb, labels)
            for name, value in retrieval_metrics(emb, labels).items():
                self.log(f"{prefix}/{name}", value, prog_bar=name == "rank1", sync_dist=True)
                logged[f"{prefix}/{name}"] = float(value)
            thr, acc = calibrate_threshold(emb, labels)
            if np.isfinite(thr):
                if calibrate:
                    self.threshold.fill_(thr)
                self.log(f"{prefix}/threshold", thr, sync_dist=True)
                self.log(f"{prefix}/pair_balanced_acc", acc, sync_dist=True)
        pairs = getattr(getattr(self.trainer, "datamodule", None), "pairs", None)
        if 1 in outputs and pairs:
            emb = torch.cat([e for e, _ in outputs[1]])
            index = torch.cat([y for _, y in outputs[1]])
            emb, index = self._gather(emb, index)
            images = self.trainer.datamodule.pair_images
            if len(torch.unique(index)) < len(images):  # e.g. --limit-val-batches: not every pair can be scored
                return logged
            by_image = emb.new_empty(len(images), emb.shape[1])
            by_image[index] = emb
            result = verify_pairs(by_image, images, pairs)
            self.log(f"{prefix}/verif_acc", result.mean, prog_bar=True, sync_dist=True)
            self.log(f"{prefix}/verif_auc", result.auc, sync_dist=True)
            logged.update({f"{prefix}/verif_acc": float(result.mean), f"{prefix}/verif_auc": float(result.auc)})
        return logged

    def _gather(self, *tensors: Tensor) -> list[Tensor]:
        """Under DDP every rank scores the whole split: its rows gathered from all ranks, in rank order."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return gather_rows([t.to(self.device) for t in tensors] if world > 1 else list(tensors),
                           lambda t: all_gather_stacked(t.to(self.device)), world)

    # ----- checkpoints -----
    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints saved before a buffer existed still open (with its default value).
        state = checkpoint.get("state_dict", {})
        for name in ("threshold", "stage", "stage_start_step", "stage_start_epoch", "best_score", "has_best", "bad_epochs"):
            state.setdefault(name, getattr(self, name).clone())

    def configure_callbacks(self):
        # The 2-D embedding page of the validation split at the end of training, next to the checkpoints.
        if self.trainer.logger and not self.trainer.fast_dev_run:
            from callbacks.embeddings import EmbeddingPlotCallback
            from models.face.verbs import embed_items

            return [EmbeddingPlotCallback(embed_items)]
        return []

    def predict_commands(self) -> list:
        from models.face.verbs import COMMANDS

        return list(COMMANDS)

