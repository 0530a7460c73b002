"""The hand network: a VMamba v0 encoder (`models.vmamba.VMambaV0`, timm names `vmamba_{micro,tiny,small}_v0`),
the SUM U-Net decoder, and the task heads.

Decoder (SUM, WACV 2025; docs/hand.md): four up stages (dims 768/384/192/96, depths 2/2/2/1); stage 0 runs VSS blocks on the
encoder output, stages 1-3 first add the skip (the input of encoder stage 4 - i), then patch-expand (Linear C -> 2C,
2x2 pixel shuffle, LayerNorm: channels halve, resolution doubles) and run their blocks; a final 4x expand and a 1x1
conv give a dense (B, 1, H, W) map, trained here on the hand silhouette.

Any timm backbone can replace the encoder (`backbone=NAME`, `timm_encoder`): its last feature levels at reductions
4, 8, 16 and 32 (`features_only`, picked from its `feature_info`), each projected by `FeatureAdapter` (1x1, LayerNorm,
channels last) to the dims of the VMamba encoder of size `encoder`, so the decoder and heads are unchanged; a level's
own map is also its decoder skip.
"""
from __future__ import annotations

from functools import cache
from typing import Any

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.vmamba.convert import load_vmamba_v0  # noqa: F401 - re-exported for models.hand.module
from models.vmamba.model import VMAMBA_V0_SIZES, Stage, VMambaV0

# The encoder sizes (VMamba v0's, `models.vmamba`) with the SUM decoder's depths.
ENCODERS: dict[str, dict[str, Any]] = {
    size: dict(spec, decoder_depths=(1, 1, 1, 1) if size == "micro" else (2, 2, 2, 1))
    for size, spec in VMAMBA_V0_SIZES.items()
}


class PatchExpand(nn.Module):
    """(B, H, W, C) -> (B, sH, sW, ratio * C / s^2): Linear C -> ratio * C (no bias), s x s pixel shuffle, LayerNorm.

    SUM's up-sampling: scale 2 with ratio 2 halves the channels; the final one (scale 4, ratio 4) quarters them."""

    def __init__(self, dim: int, scale: int = 2, ratio: int = 2):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, ratio * dim, bias=False)
        self.norm = nn.LayerNorm(ratio * dim // scale**2)

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale
        return self.norm(rearrange(self.expand(x), "b h w (p q c) -> b (h p) (w q) c", p=s, q=s))


# ----------------------------------------------------------------------------------------------------------------------
# Any timm backbone as the encoder
# ----------------------------------------------------------------------------------------------------------------------
LEVEL_REDUCTIONS = (4, 8, 16, 32)  # the scales the U-Net decoder and the heads read


@cache
def timm_feature_levels(name: str) -> tuple[int, ...]:
    """Indices into timm model `name`'s `feature_info` of its last level at each reduction 4, 8, 16, 32 (read from a
    weightless build on the meta device). A `ZooError` for an unknown name (`check_backbone_name`); a `ValueError`
    saying which reductions it has when one of the four is missing."""
    from models.backbones import check_backbone_name

    check_backbone_name(name)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
    except Exception:  # noqa: BLE001 - a model whose constructor computes on its tensors: build it for real
        model = timm.create_model(name, num_classes=0)
    info = list(getattr(getattr(model, "feature_info", None), "info", getattr(model, "feature_info", None)) or [])
    last = {int(f["reduction"]): i for i, f in enumerate(info) if "reduction" in f}
    missing = [r for r in LEVEL_REDUCTIONS if r not in last]
    if missing:
        has = ", ".join(map(str, sorted(last))) or "none (no feature_info)"
        raise ValueError(f"{name} has feature levels at reductions {has}, none at {', '.join(map(str, missing))}")
    return tuple(last[r] for r in LEVEL_REDUCTIONS)


def timm_encoder(name: str, pretrained: bool = False, drop_path: float = 0.0) -> nn.Module:
    """timm model `name` with `features_only`: (B, 3, H, W) -> its four maps [(B, C_i, H/r, W/r) for r = 4, 8, 16, 32]
    (`timm_feature_levels`), built by `models.backbones.create_backbone` (with `pretrained`, the published weights:
    the local cache, else a download)."""
    from models.backbones import create_backbone

    extra = {"drop_path_rate": drop_path} if drop_path else {}
    return create_backbone(name, pretrained=pretrained, features_only=True, out_indices=timm_feature_levels(name),
                           **extra)


class FeatureAdapter(nn.Module):
    """timm feature maps [(B, C_i, H/r_i, W/r_i)] (or channels last with `channels_last`, as Swin's) ->
    [(B, H/r_i, W/r_i, dims[i])] channels last, what `VMambaV0.stages` gives: per level a 1x1 projection (Linear on
    channels last) and LayerNorm. Keys proj.i.*, norm.i.*."""

    def __init__(self, channels: list[int], dims: list[int], channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.proj = nn.ModuleList(nn.Linear(c, d) for c, d in zip(channels, dims))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for d in dims)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if not self.channels_last:
            feats = [f.permute(0, 2, 3, 1) for f in feats]
        return [norm(proj(f)) for f, proj, norm in zip(feats, self.proj, self.norm)]


# ----------------------------------------------------------------------------------------------------------------------
# Decoder and heads
# ----------------------------------------------------------------------------------------------------------------------
class UNetDecoder(nn.Module):
    """SUM's decoder: encoder stage outputs/inputs -> (decoder stage outputs [8C at H/32, ..., C at H/4], dense logits
    (B, out_chans, H, W)). Keys layers_up.i.{upsample,blocks}.*, final_up.*, final_conv.*."""

    def __init__(self, dims: list[int], depths=(2, 2, 2, 1), d_state: int = 16, out_chans: int = 1):
        super().__init__()
        up_dims = dims[::-1]
        self.layers_up = nn.ModuleList()
        for i, (d, n) in enumerate(zip(up_dims, depths)):
            stage = Stage(d, n, d_state, [0.0] * n, downsample=False)
            stage.upsample = PatchExpand(up_dims[i - 1]) if i > 0 else None
            self.layers_up.append(stage)
        self.final_up = PatchExpand(dims[0], scale=4, ratio=4)
        self.final_conv = nn.Conv2d(dims[0] // 4, out_chans, 1)

    def forward(self, outs: list[Tensor], ins: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        x = outs[-1]
        feats = []
        for i, stage in enumerate(self.layers_up):
            if i > 0:
                x = stage.upsample(x + ins[len(ins) - i])
            x = stage(x)
            feats.append(x)
        dense = self.final_conv(self.final_up(x).permute(0, 3, 1, 2))
        return feats, dense


class MLPHead(nn.Module):
    """Upstream's head: Linear 512, BN, ReLU, Dropout, Linear 256, BN, ReLU, Dropout, Linear n."""

    def __init__(self, in_features: int, n: int, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(256, n))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class HandNet(nn.Module):
    """Image (B, 3, S, S), ImageNet-normalised -> dict of
    identity (B, num_identities), gender (B, 2), age (B, num_age_groups) logits, embedding (B, E) unit-norm, and with
    the decoder silhouette (B, 1, S, S) logits.

    head="multiscale" (ours): global average pools of the four encoder stages and (with the decoder) the four
    decoder stages, concatenated and LayerNorm-ed, into linear identity / gender / age / embedding heads.
    head="published": sigmoid on the last stage (S/32 x S/32 x 8C, channels last) flattened into three `MLPHead`s;
    the embedding is that flattened vector, L2-normalised.

    backbone="own": `encoder` is `VMambaV0` of size cfg.encoder; any other name: `encoder` is that timm model's
    four levels (`timm_encoder`, random weights; `HandBiometrics` loads `pretrained` ones) and `adapter` projects them
    to the same dims (C = the VMamba size's embed_dim).
    """

    def __init__(self, cfg: Any):
        super().__init__()
        spec = ENCODERS[cfg.encoder]
        if cfg.backbone == "own":
            self.encoder = VMambaV0(spec["embed_dim"], spec["depths"], spec["d_state"], cfg.drop_path)
            dims = self.encoder.dims
            self.adapter = None
        else:
            self.encoder = timm_encoder(cfg.backbone, drop_path=cfg.drop_path)
            dims = [spec["embed_dim"] * 2**i for i in range(len(LEVEL_REDUCTIONS))]
            fmt = getattr(self.encoder, "output_fmt", "NCHW")
            self.adapter = FeatureAdapter(self.encoder.feature_info.channels(), dims,
                                          channels_last=getattr(fmt, "value", fmt) == "NHWC")
        self.decoder = UNetDecoder(dims, spec["decoder_depths"], spec["d_state"]) if cfg.decoder else None
        self.published = cfg.head == "published"
        n_id, n_age, n_gender = cfg.num_identities, cfg.num_age_groups, len(cfg.gender_names)
        if self.published:
            flat = (cfg.image_size // 32) ** 2 * dims[-1]
            self.identity_head = MLPHead(flat, n_id, cfg.head_dropout)
            self.age_head = MLPHead(flat, n_age, cfg.head_dropout)
            self.gender_head = MLPHead(flat, n_gender, cfg.head_dropout)
            self.embedding_dim = flat
        else:
            width = sum(dims) * (2 if cfg.decoder else 1)
            self.neck = nn.Sequential(nn.LayerNorm(width), nn.Dropout(cfg.head_dropout))
            self.identity_head = nn.Linear(width, n_id)
            self.age_head = nn.Linear(width, n_age)
            self.gender_head = nn.Linear(width, n_gender)
            self.embedding_head = nn.Linear(width, cfg.embedding_dim)
            self.embedding_dim = cfg.embedding_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.adapter is None:
            outs, ins = self.encoder.stages(x)
        else:
            outs = self.adapter(self.encoder(x))
            ins = outs
        out: dict[str, Tensor] = {}
        feats = list(outs)
        if self.decoder is not None:
            dec, dense = self.decoder(outs, ins)
            feats += dec
            out["silhouette"] = dense
        if self.published:
            h = torch.sigmoid(outs[-1]).flatten(1)
            out["embedding"] = F.normalize(h.float(), dim=-1)
        else:
            h = self.neck(torch.cat([f.mean(dim=(1, 2)) for f in feats], dim=-1))
            out["embedding"] = F.normalize(self.embedding_head(h).float(), dim=-1)
        out.update(identity=self.identity_head(h), gender=self.gender_head(h), age=self.age_head(h))
        return out
