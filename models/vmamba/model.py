"""VMamba v0, the classifier of VMamba's first releases (`vssmtiny_dp01_ckpt_epoch_292.pth`,
`vssmsmall_dp03_ckpt_epoch_238.pth`); timm names `vmamba_micro_v0`, `vmamba_tiny_v0`, `vmamba_small_v0` (with
`features_only`).

4x4 patch conv 3 -> C + LayerNorm, four stages of VSS blocks (dims C/2C/4C/8C, d_state 16, d_conv 3, expand 2),
each of the first three ending in patch merging (2x2 neighbours concatenated, LayerNorm(4C), Linear 4C -> 2C); the
classifier normalises every position of the last stage (LayerNorm), then average-pools, then `head`. Every LayerNorm
has eps 1e-5 (VMamba's VSSM passes `nn.LayerNorm` to its blocks). Keys are VMamba's after `vmamba_key_map`
(`layers.i.blocks.j.{norm,mixer}.*`, `layers.i.downsample.*`, `norm`, `head`); `models.vmamba.convert` reads the
release files. Parity with VMamba's own code on the same weights: docs/fidelity.md.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from models.blocks import VSSBlock
from zoo.errors import ZooError

# VMamba v0 sizes (VMamba classification/configs/vssm/vmambav0_*_224.yaml); micro is a CPU-sized model of the same layout.
VMAMBA_V0_SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(embed_dim=16, depths=(1, 1, 1, 1), d_state=8),
    "tiny": dict(embed_dim=96, depths=(2, 2, 9, 2), d_state=16),
    "small": dict(embed_dim=96, depths=(2, 2, 27, 2), d_state=16),
}
NORM_EPS = 1e-5  # nn.LayerNorm's default, which VMamba v0 (and SUM) pass to every block


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


class Stage(nn.Module):
    """VSS blocks at one resolution (LayerNorm eps 1e-5), optionally followed (encoder) by patch merging, which
    `forward` does not apply (callers read the stage output first). Keys blocks.j.*, downsample.*."""

    def __init__(self, dim: int, depth: int, d_state: int, drop_path: list[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, drop_path=drop_path[j], d_state=d_state, norm_eps=NORM_EPS)
                                    for j in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class VMambaV0(nn.Module):
    """VMamba v0 encoder: (B, 3, H, W) -> stage outputs [(B, H/4, W/4, C), ..., (B, H/32, W/32, 8C)], channels last.

    `forward` gives the classifier output (B, num_classes): LayerNorm `norm` on every position of the last stage,
    average pool, `head` (num_classes 0: the pooled features, 8C).
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
        """(B, 3, H, W) -> the last stage's output (B, H/32, W/32, 8C), before `norm`."""
        return self.stages(x)[0][-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, h, w, 8C) -> logits (B, num_classes), or with `pre_logits` the pooled features (B, 8C)."""
        x = self.norm(x).mean(dim=(1, 2))
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


# ----------------------------------------------------------------------------------------------------------------------
# timm registration
# ----------------------------------------------------------------------------------------------------------------------
def _vmamba_cfg(size: str) -> dict[str, Any]:
    from models.vmamba.convert import RELEASES

    release = RELEASES.get(size, {})
    return dict(url=release.get("url", ""), num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="patch_embed.proj", classifier="head", license="mit",
                origin_url="https://github.com/MzeroMiko/VMamba", paper_ids="arXiv:2401.10166",
                description=release.get("metric", "no released weights (CPU-sized layout)"),
                notes=f"file={release['file']}; sha256={release['sha256']}" if release else "")


default_cfgs = generate_default_cfgs({f"vmamba_{s}_v0": _vmamba_cfg(s) for s in VMAMBA_V0_SIZES})


def _create(size: str, pretrained: bool, **kwargs: Any) -> VMambaV0:
    from models.vmamba.convert import RELEASES, load_vmamba_v0, vmamba_v0_release_state

    if pretrained and size not in RELEASES:
        raise ZooError(f"vmamba_{size}_v0 has no released weights (vmamba_tiny_v0 and vmamba_small_v0 have).")
    kwargs.setdefault("num_classes", 1000 if size != "micro" else 0)
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    model = build_model_with_cfg(VMambaV0, f"vmamba_{size}_v0", False, **VMAMBA_V0_SIZES[size], **kwargs,
                                 feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)))
    if pretrained:  # the release, downloaded once, converted and cached as safetensors (zoo.pretrained)
        from zoo.pretrained import pretrained_state

        state = pretrained_state(f"vmamba_{size}_v0", _vmamba_cfg(size), vmamba_v0_release_state)
        report = load_vmamba_v0(model, state)
        if [k for k in report["missing"] if not k.startswith("head.")]:
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
