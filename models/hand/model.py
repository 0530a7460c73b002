"""The hand network: a VMamba v0 encoder, the SUM U-Net decoder, and the task heads; timm names `vmamba_micro_v0`,
`vmamba_tiny_v0`, `vmamba_small_v0` (with `features_only`).

Encoder (VMamba v0, the layout of `vssmtiny_dp01_ckpt_epoch_292.pth` / `vssmsmall_dp03_ckpt_epoch_238.pth`):
4x4 patch conv 3 -> 96 + LayerNorm, four stages of VSS blocks (dims 96/192/384/768, d_state 16, d_conv 3, expand 2),
each of the first three ending in patch merging (2x2 neighbours concatenated, LayerNorm(4C), Linear 4C -> 2C). Its
keys are VMamba's after `vmamba_key_map` (`layers.i.blocks.j.{norm,mixer}.*`, `layers.i.downsample.*`, `norm`, `head`).

Decoder (SUM, UPSTREAM.md): four up stages (dims 768/384/192/96, depths 2/2/2/1); stage 0 runs VSS blocks on the
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
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from models.blocks import VSSBlock, vmamba_key_map
from zoo.errors import ZooError

# VMamba v0 sizes (UPSTREAM.md); micro is a CPU-sized model of the same layout.
ENCODERS: dict[str, dict[str, Any]] = {
    "micro": dict(embed_dim=16, depths=(1, 1, 1, 1), d_state=8, decoder_depths=(1, 1, 1, 1)),
    "tiny": dict(embed_dim=96, depths=(2, 2, 9, 2), d_state=16, decoder_depths=(2, 2, 2, 1)),
    "small": dict(embed_dim=96, depths=(2, 2, 27, 2), d_state=16, decoder_depths=(2, 2, 2, 1)),
}


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, C) channels last: conv kernel = stride = p, LayerNorm. Keys proj.*, norm.*."""

    def __init__(self, dim: int, patch_size: int = 4, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): the 2x2 neighbours (VMamba's order) concatenated, LayerNorm, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        x = x[:, :h, :w]
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


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


class Stage(nn.Module):
    """VSS blocks at one resolution, optionally followed (encoder) by patch merging. Keys blocks.j.*, downsample.*."""

    def __init__(self, dim: int, depth: int, d_state: int, drop_path: list[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, drop_path=drop_path[j], d_state=d_state) for j in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class VMambaV0(nn.Module):
    """VMamba v0 encoder: (B, 3, H, W) -> stage outputs [(B, H/4, W/4, C), ..., (B, H/32, W/32, 8C)], channels last.

    `forward` gives timm's classifier output: mean-pooled, `norm`, `head` (num_classes 0 = pooled features, 8C).
    """

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 9, 2), d_state: int = 16, drop_path: float = 0.0,
                 num_classes: int = 0, in_chans: int = 3, **_: Any):
        super().__init__()
        self.dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.dims[-1]
        self.patch_embed = PatchEmbed(embed_dim, 4, in_chans)
        rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList(
            Stage(d, n, d_state, rates[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < len(depths) - 1)
            for i, (d, n) in enumerate(zip(self.dims, depths)))
        self.norm = nn.LayerNorm(self.num_features)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"layers.{i}") for i, d in enumerate(self.dims)]

    def stages(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(stage outputs before merging, stage inputs) for the four stages, channels last."""
        x = self.patch_embed(x)
        outs, ins = [], []
        for layer in self.layers:
            ins.append(x)
            x = layer(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs, ins

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(x)[0][-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: stage outputs (NCHW or NHWC) at `indices` (int n = the last n; default all)."""
        outs, _ = self.stages(x)
        n = len(outs)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        feats = [outs[i] if output_fmt == "NHWC" else outs[i].permute(0, 3, 1, 2).contiguous() for i in take]
        if intermediates_only:
            return feats
        return self.norm(outs[-1]), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def load_vmamba_v0(encoder: VMambaV0, source: str | dict[str, Tensor], ema: bool = False) -> dict[str, list[str]]:
    """Load VMamba v0 weights (a release file, read as data by `zoo.checkpoint.read_state_dict`: its `model` entry,
    or `model_ema` with `ema`; or a state_dict) into `encoder` through `vmamba_key_map`. Returns {"missing": [...],
    "unexpected": [...], "mismatched": [...]}: the encoder keys not loaded, the checkpoint keys not used (e.g.
    `head.*` for another class count), and those with a different shape (skipped)."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from zoo.checkpoint import read_state_dict

        state = read_state_dict(source, ("model_ema", "model") if ema else ("model",), "pretrained_ckpt")
    else:
        state = source
    state = vmamba_key_map({k.removeprefix("module."): v for k, v in state.items()})
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {"missing": sorted(set(own) - set(usable)), "unexpected": sorted(set(state) - set(own)),
              "mismatched": sorted(k for k in state if k in own and own[k].shape != state[k].shape)}
    encoder.load_state_dict(usable, strict=False)
    return report


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

    backbone="vmamba": `encoder` is `VMambaV0` of size cfg.encoder; any other name: `encoder` is that timm model's
    four levels (`timm_encoder`, random weights; `HandBiometrics` loads `pretrained` ones) and `adapter` projects them
    to the same dims (C = the VMamba size's embed_dim).
    """

    def __init__(self, cfg: Any):
        super().__init__()
        spec = ENCODERS[cfg.encoder]
        if cfg.backbone == "vmamba":
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


# ----------------------------------------------------------------------------------------------------------------------
# timm registration
# ----------------------------------------------------------------------------------------------------------------------
_V0_URL = "https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/"
VMAMBA_V0_RELEASES = {  # UPSTREAM.md "Released files" (sizes and sha256 from git-lfs pointers of a vendoring repo)
    "tiny": dict(url=_V0_URL + "vssmtiny_dp01_ckpt_epoch_292.pth", description="ImageNet-1k top-1 82.2% (published)",
                 notes="file=vssmtiny_dp01_ckpt_epoch_292.pth; "
                       "sha256=dbc0cc4f5ec0e45db5fba7c939d2c7d9b617e891ac10766912a8d604c37c5e47"),
    "small": dict(url=_V0_URL + "vssmsmall_dp03_ckpt_epoch_238.pth", description="ImageNet-1k top-1 83.5% (published)",
                  notes="file=vssmsmall_dp03_ckpt_epoch_238.pth; "
                        "sha256=8a9b3d3954bd28265405bd9a86768599d11491ba414ce04011db837d6c319e14"),
}


def _vmamba_cfg(size: str) -> dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="patch_embed.proj", classifier="head", license="mit",
                origin_url="https://github.com/MzeroMiko/VMamba") | VMAMBA_V0_RELEASES.get(size, {})


default_cfgs = generate_default_cfgs({f"vmamba_{s}_v0": _vmamba_cfg(s) for s in ENCODERS})


def vmamba_v0_release_state(path) -> dict[str, Tensor]:
    """A VMamba v0 release file's `model` entry under our names (`zoo.pretrained` converts and caches it)."""
    from zoo.checkpoint import read_state_dict

    return vmamba_key_map(read_state_dict(path, ("model",), "VMamba v0 release"))


def _create(size: str, pretrained: bool, **kwargs: Any) -> VMambaV0:
    if pretrained and size not in VMAMBA_V0_RELEASES:
        raise ZooError(f"vmamba_{size}_v0 has no released weights (vmamba_tiny_v0 and vmamba_small_v0 have).")
    spec = {k: v for k, v in ENCODERS[size].items() if k != "decoder_depths"}
    kwargs.setdefault("num_classes", 1000 if size != "micro" else 0)
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    model = build_model_with_cfg(VMambaV0, f"vmamba_{size}_v0", False, **spec, **kwargs,
                                 feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)))
    if pretrained:
        from zoo.pretrained import pretrained_state

        state = pretrained_state(f"vmamba_{size}_v0", _vmamba_cfg(size), vmamba_v0_release_state)
        report = load_vmamba_v0(model, state)
        if report["missing"] and [k for k in report["missing"] if not k.startswith("head.")]:
            raise ZooError(f"vmamba_{size}_v0: the released weights leave {report['missing'][:4]} unloaded.")
    return model


@register_model
def vmamba_micro_v0(pretrained: bool = False, **kwargs: Any) -> VMambaV0:
    """CPU-sized VMamba v0 layout (embed 16, depths 1/1/1/1, d_state 8), no weights."""
    return _create("micro", pretrained, **kwargs)


@register_model
def vmamba_tiny_v0(pretrained: bool = False, **kwargs: Any) -> VMambaV0:
    """VMamba-T v0 (depths 2/2/9/2, dims 96-768; VMamba's vssmtiny_dp01_ckpt_epoch_292.pth layout)."""
    return _create("tiny", pretrained, **kwargs)


@register_model
def vmamba_small_v0(pretrained: bool = False, **kwargs: Any) -> VMambaV0:
    """VMamba-S v0 (depths 2/2/27/2, dims 96-768; VMamba's vssmsmall_dp03_ckpt_epoch_238.pth layout)."""
    return _create("small", pretrained, **kwargs)

