"""Face embeddings: a patch-conv + Mamba-2 encoder (or any timm backbone), a linear head to a unit-length embedding, and
the LightningModule that trains it with metric losses and evaluates retrieval and LFW verification.

The `published` preset is upstream FaceRegSMM's RecSSM (UPSTREAM.md: Face recognition): 8x8 patch conv 3->128 +
LayerNorm (256 tokens at 128x128), 6 pre-norm residual Mamba-2 blocks with LayerNorm, final LayerNorm, mean pooling,
Linear -> 128, L2 normalisation. Our defaults add a learnt position embedding and bidirectional Mamba-2 mixers.
"""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from losses.metric import MetricLoss
from model_config import FaceConfig
from models.base import ZooModule
from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mamba2 import Mamba2
from models.blocks.residual import Block
from models.face_metrics import calibrate_threshold, retrieval_metrics


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, (H/p)(W/p), dim): one conv with kernel = stride = p, flattened row-major, LayerNorm."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(rearrange(self.proj(x), "b d h w -> b (h w) d"))


class MambaFaceEncoder(nn.Module):
    """Patch embedding (+ optional learnt position embedding), `depth` pre-norm residual Mamba-2 blocks (LayerNorm),
    final LayerNorm and mean pooling over tokens: (B, 3, S, S) -> (B, d_model). `num_features` = d_model.

    State-dict keys: patch_embed.{proj,norm}.*, pos_embed, blocks.{i}.{norm,mixer}.*, final_norm.*.
    """

    def __init__(self, cfg: FaceConfig):
        super().__init__()
        d = cfg.d_model
        self.num_features = d
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, d)) if cfg.pos_embed else None
        mixer = BidirectionalMamba2 if cfg.bidirectional else Mamba2
        self.blocks = nn.ModuleList(
            Block(d, partial(mixer, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim,
                             layer_idx=i), norm_cls=nn.LayerNorm, residual_in_fp32=True)
            for i in range(cfg.depth)
        )
        self.final_norm = nn.LayerNorm(d)
        if self.pos_embed is not None and not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x)
        if self.pos_embed is not None:
            if h.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"input gives {h.shape[1]} tokens but the position embedding has "
                                 f"{self.pos_embed.shape[1]}: feed images of the configured image_size")
            h = h + self.pos_embed
        residual = None
        for block in self.blocks:
            h, residual = block(h, residual)
        h = self.final_norm((h + residual).to(self.final_norm.weight.dtype) if residual is not None else h)
        return h.mean(dim=1)


class FaceEmbeddingNet(nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> embedding (B, embedding_dim), unit L2 norm (cosine similarity = dot product).

    The encoder is `MambaFaceEncoder` (cfg.backbone == "mamba") or any timm model from `models.backbones`
    (pooled features); the head is one Linear layer.
    """

    def __init__(self, cfg: FaceConfig):
        super().__init__()
        if cfg.backbone == "mamba":
            self.encoder = MambaFaceEncoder(cfg)
        else:
            from models.backbones import create_backbone

            self.encoder = create_backbone(cfg.backbone, pretrained=cfg.pretrained)
        self.head = nn.Linear(self.encoder.num_features, cfg.embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.encoder(x)), dim=-1)


def upstream_state_dict_to_zoo(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of an upstream FaceRegSMM `RecSSM` state_dict to `FaceEmbedder`'s (published preset)."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.").removeprefix("model.")
        if k.startswith("ssm_blocks."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{i}.mixer.{rest}"
        elif k.startswith("norms."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{i}.norm.{rest}"
        out[("net.head." + k[5:]) if k.startswith("head.") else f"net.encoder.{k}"] = v
    return out


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

            return [EmbeddingPlotCallback()]
        return []

    def predict_commands(self) -> list:
        from models.face_commands import face_commands

        return face_commands()


def verify_pairs(embeddings: Tensor, images: list, pairs: list):
    """k-fold verification of `pairs` (datamodules.lfw_pairs.Pair) given (N, D) embeddings of `images` (same order)."""
    from datamodules.lfw_pairs import kfold_verification

    where = {p: i for i, p in enumerate(images)}
    a = embeddings[[where[p.a] for p in pairs]]
    b = embeddings[[where[p.b] for p in pairs]]
    scores = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).numpy()
    return kfold_verification(scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))
