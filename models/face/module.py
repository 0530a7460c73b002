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
from models.face.metrics import calibrate_threshold, retrieval_metrics
from models.face.model import FaceEmbeddingNet
from zoo.module import ZooModule


class FaceEmbedder(ZooModule):
    """Face-embedding LightningModule (task "face"): `model(images (B, 3, S, S)) -> (B, D)` unit embeddings.

    Training: `cfg.loss` (triplet with a `cfg.miner`, ArcFace or CosFace; the loss is a submodule, so ArcFace /
    CosFace class weights are optimised too) on P x K batches. Two-stage schedule (upstream: "all" then "hard"
    triplets): with `cfg.stage2_miner` set and `cfg.stage2_epoch` > 0, at that epoch the miner is switched and a
    fresh optimiser and warm-up + cosine schedule over the remaining epochs are created; the current stage is a buffer,
    so a resumed run continues in the right stage.

    Validation (dataloader 0 = the val split): precision@1 (upstream's "Recall@1"), R-Precision and MAP@R; the
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
        self.loss_fn = MetricLoss(cfg.loss, cfg.embedding_dim, cfg.num_classes, cfg.margin, cfg.scale, cfg.miner)
        self.register_buffer("threshold", torch.tensor(0.5))  # cosine similarity; upstream's fixed value until calibrated
        self.register_buffer("stage", torch.tensor(1))
        self.register_buffer("stage_start_step", torch.tensor(0))
        self._outputs: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """Embeddings of a (N, 3, S, S) batch in eval mode, in chunks: (N, D) float32 on the CPU."""
        self.eval()
        return torch.cat([self(images[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(images), batch_size)])

    def same_person(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine similarity of paired embeddings (N, D) x (N, D) -> (N,), and whether it reaches the threshold."""
        sim = (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)
        return sim, sim >= self.threshold.float().cpu().item()

    # ----- training -----
    @property
    def two_stage(self) -> bool:
        return self.cfg.stage2_miner is not None and self.cfg.stage2_epoch > 0

    def on_fit_start(self) -> None:
        if int(self.stage) == 2:  # resumed in stage 2
            self.loss_fn.set_miner(self.cfg.stage2_miner)

    def on_train_epoch_start(self) -> None:
        if self.two_stage and int(self.stage) == 1 and self.current_epoch >= self.cfg.stage2_epoch:
            self.stage.fill_(2)
            self.stage_start_step.fill_(self.global_step)
            self.loss_fn.set_miner(self.cfg.stage2_miner)
            self.trainer.strategy.setup_optimizers(self.trainer)  # calls configure_optimizers for stage 2
            print(f"[face] epoch {self.current_epoch}: stage 2 (miner '{self.cfg.stage2_miner}', fresh optimiser)")

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss_fn(self(images), labels)
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
            start = self.cfg.stage2_epoch if int(self.stage) == 2 else 0
            scheduler.step(epoch=self.current_epoch + 1 - start)
        else:
            scheduler.step_update(num_updates=self.global_step - int(self.stage_start_step))

    # ----- evaluation -----
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images, labels = batch
        self._outputs[dataloader_idx].append((self(images).float().cpu(), labels.cpu()))

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val", calibrate=not self.trainer.sanity_checking)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", calibrate=False)

    def _evaluate(self, prefix: str, calibrate: bool) -> None:
        outputs, self._outputs = self._outputs, defaultdict(list)
        if 0 in outputs:
            emb = torch.cat([e for e, _ in outputs[0]])
            labels = torch.cat([y for _, y in outputs[0]])
            for name, value in retrieval_metrics(emb, labels).items():
                self.log(f"{prefix}/{name}", value, prog_bar=name == "precision_at_1")
            thr, acc = calibrate_threshold(emb, labels)
            if np.isfinite(thr):
                if calibrate:
                    self.threshold.fill_(thr)
                self.log(f"{prefix}/threshold", thr)
                self.log(f"{prefix}/pair_balanced_acc", acc)
        pairs = getattr(getattr(self.trainer, "datamodule", None), "pairs", None)
        if 1 in outputs and pairs:
            emb = torch.cat([e for e, _ in outputs[1]])
            index = torch.cat([y for _, y in outputs[1]])
            images = self.trainer.datamodule.pair_images
            if len(torch.unique(index)) < len(images):  # e.g. --limit-val-batches: not every pair can be scored
                return
            by_image = emb.new_empty(len(images), emb.shape[1])
            by_image[index] = emb
            result = verify_pairs(by_image, images, pairs)
            self.log(f"{prefix}/verif_acc", result.mean, prog_bar=True)
            self.log(f"{prefix}/verif_auc", result.auc)

    # ----- checkpoints -----
    def on_load_checkpoint(self, checkpoint) -> None:
        # Checkpoints saved before a buffer existed still open (with its default value).
        state = checkpoint.get("state_dict", {})
        for name in ("threshold", "stage", "stage_start_step"):
            state.setdefault(name, getattr(self, name).clone())

    def configure_callbacks(self):
        # The 2-D embedding page of the validation split at the end of training, next to the checkpoints.
        if self.trainer.logger and not self.trainer.fast_dev_run:
            from callbacks.embeddings import EmbeddingPlotCallback
            from models.face.verbs import embed_items

            return [EmbeddingPlotCallback(embed_items)]
        return []

    def predict_commands(self) -> list:
        from models.face.verbs import face_commands

        return face_commands()


def verify_pairs(embeddings: Tensor, images: list, pairs: list):
    """k-fold verification of `pairs` (datamodules.lfw_pairs.Pair) given (N, D) embeddings of `images` (same order)."""
    from datamodules.lfw_pairs import kfold_verification

    where = {p: i for i, p in enumerate(images)}
    a = embeddings[[where[p.a] for p in pairs]]
    b = embeddings[[where[p.b] for p in pairs]]
    scores = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).numpy()
    return kfold_verification(scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))
