"""Face embedding network: a patch-conv + Mamba-2 encoder (or any timm backbone) and a linear head to a unit-length
embedding; the encoder is registered with timm as `face_mamba_micro/tiny/small`.

The `published` preset is upstream FaceRegSMM's RecSSM (docs/face.md): 8x8 patch conv 3->128 +
LayerNorm (256 tokens at 128x128), 6 pre-norm residual Mamba-2 blocks with LayerNorm, final LayerNorm, mean pooling,
Linear -> 128, L2 normalisation. Our defaults add a learnt position embedding and bidirectional Mamba-2 mixers;
`micro` replaces the patch conv by a convolutional stem (`stem="conv"`, models/blocks/stem.py).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from model_config import FaceConfig
from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mamba2 import Mamba2
from models.blocks.residual import Block
from models.blocks.stem import ConvStem


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, (H/p)(W/p), dim): one conv with kernel = stride = p, flattened row-major, LayerNorm."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(rearrange(self.proj(x), "b d h w -> b (h w) d"))


class ConvPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, (H/2p)(W/2p), dim): the convolutional stem (`models.blocks.stem.ConvStem`: 7x7 stride-2
    conv and two 3x3 convs with BatchNorm + ReLU, then a p x p projection), flattened row-major, LayerNorm."""

    def __init__(self, patch_size: int, dim: int, channels: int = 32, in_chans: int = 3):
        super().__init__()
        self.stem = ConvStem(in_chans, dim, patch_size, channels)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(rearrange(self.stem(x), "b d h w -> b (h w) d"))


def num_tokens(cfg: FaceConfig) -> int:
    """Tokens the stem gives at `cfg.image_size`: (S/p)^2 for the patch conv, (ceil(S/2)/p)^2 for the conv stem."""
    side = cfg.image_size if cfg.stem == "patch" else (cfg.image_size + 1) // 2
    return (side // cfg.patch_size) ** 2


class MambaFaceEncoder(nn.Module):
    """Patch embedding (`stem="patch"`: one p x p conv; `stem="conv"`: a convolutional stem of stride 2p)
    (+ optional learnt position embedding), `depth` pre-norm residual Mamba-2 blocks (LayerNorm),
    final LayerNorm and mean pooling over tokens: (B, 3, S, S) -> (B, d_model). `num_features` = d_model.

    State-dict keys: patch_embed.{proj,norm}.* (conv stem: patch_embed.{stem.*,norm.*}), pos_embed,
    blocks.{i}.{norm,mixer}.*, final_norm.*.
    """

    def __init__(self, cfg: FaceConfig):
        super().__init__()
        d = cfg.d_model
        self.num_features = d
        self.patch_embed = (PatchEmbed(cfg.patch_size, d) if cfg.stem == "patch"
                            else ConvPatchEmbed(cfg.patch_size, d, cfg.stem_channels))
        self.num_tokens = num_tokens(cfg)
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

    The encoder is `MambaFaceEncoder` (cfg.backbone == "own") or any timm model from `models.backbones`
    (pooled features); the head is one Linear layer.
    """

    def __init__(self, cfg: FaceConfig):
        super().__init__()
        if cfg.backbone == "own":
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


# ----------------------------------------------------------------------------------------------------------------------
# timm registration: the face encoder as a backbone (`timm.create_model("face_mamba_micro", num_classes=0)`)
# ----------------------------------------------------------------------------------------------------------------------
class MambaFaceBackbone(MambaFaceEncoder):
    """`MambaFaceEncoder` with timm's classifier interface: (B, 3, S, S) -> logits (B, num_classes), or pooled
    features (B, d_model) with `num_classes=0`. Keyword arguments other than timm's are FaceConfig fields."""

    def __init__(self, preset: str = "micro", num_classes: int = 0, in_chans: int = 3, **fields: Any):
        if in_chans != 3:
            raise ValueError("the face encoder takes RGB input (in_chans=3)")
        fields = {k: v for k, v in fields.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay")}
        if "img_size" in fields:
            fields["image_size"] = fields.pop("img_size")
        super().__init__(FaceConfig.from_presets(preset).replace(**fields))
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(super().forward(x))


def _face_cfg(preset: str) -> dict[str, Any]:
    cfg = FaceConfig.from_presets(preset)
    size, first_conv = cfg.image_size, "patch_embed.proj" if cfg.stem == "patch" else "patch_embed.stem.conv1"
    # The face task normalises images to [-1, 1].
    return dict(url="", num_classes=0, input_size=(3, size, size), pool_size=None, crop_pct=1.0,
                interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv=first_conv,
                classifier="head", license="apache-2.0")


default_cfgs = generate_default_cfgs({f"face_mamba_{p}": _face_cfg(p) for p in ("micro", "tiny", "small")})


def _create_face(variant: str, preset: str, pretrained: bool = False, **kwargs: Any) -> MambaFaceBackbone:
    if pretrained:
        raise ValueError(f"{variant} has no published weights; start from a face checkpoint with --set init_from=CKPT")
    return build_model_with_cfg(MambaFaceBackbone, variant, False, preset=preset, **kwargs)


@register_model
def face_mamba_micro(pretrained: bool = False, **kwargs: Any) -> MambaFaceBackbone:
    """The face task's micro encoder (d_model 64, 2 bidirectional Mamba-2 layers), 64x64 input."""
    return _create_face("face_mamba_micro", "micro", pretrained, **kwargs)


@register_model
def face_mamba_tiny(pretrained: bool = False, **kwargs: Any) -> MambaFaceBackbone:
    """The face task's tiny encoder (d_model 192, 12 bidirectional Mamba-2 layers), 112x112 input."""
    return _create_face("face_mamba_tiny", "tiny", pretrained, **kwargs)


@register_model
def face_mamba_small(pretrained: bool = False, **kwargs: Any) -> MambaFaceBackbone:
    """The face task's small encoder (d_model 384, 12 bidirectional Mamba-2 layers), 112x112 input."""
    return _create_face("face_mamba_small", "small", pretrained, **kwargs)
