"""DeMansia 2: an LV-ViT conv stem, a middle class token and a stack of bidirectional Mamba-2 layers (two of them
attention) with a class head and a token (aux) head; trained with token labeling, MixToken and EMA.

- `DeMansia2Net`: the backbone + heads (a timm-style model: `forward_features`, `forward_head`, `num_classes=0`,
  `forward_intermediates` for `features_only`). Its state_dict keys are those of the released checkpoint
  (docs/demansia2.md), so conversion is a prefix change (checkpoints/convert_demansia2.py).
- `DeMansia2`: the LightningModule (losses, MixToken, raw + EMA validation, the `classify` verb).
- timm names `demansia2_micro`, `demansia2_tiny`, `demansia2_small` (registered on import).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from model_config import DeMansia2Config
from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mha import MHA
from models.blocks.norm import RMSNorm
from models.blocks.residual import Block
from models.blocks.stem import ConvStem, EarlyConvStem
from zoo.errors import ZooError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------------
def mix_box(grid: tuple[int, int], generator: torch.Generator | None = None) -> tuple[tuple[int, int, int, int], float]:
    """MixToken's box on a (gh, gw) token grid: lambda ~ Beta(1, 1), a box of area ~(1 - lambda) at a uniform centre,
    clipped to the grid. Returns ((top, left, bottom, right) end-exclusive, lam = 1 - box area / grid area)."""
    gh, gw = grid
    lam = torch.rand((), generator=generator).item()  # Beta(1, 1) is Uniform(0, 1)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(gh * cut), int(gw * cut)
    cy = int(torch.randint(gh, (), generator=generator))
    cx = int(torch.randint(gw, (), generator=generator))
    top, bottom = min(max(cy - ch // 2, 0), gh), min(max(cy + ch // 2, 0), gh)
    left, right = min(max(cx - cw // 2, 0), gw), min(max(cx + cw // 2, 0), gw)
    return (top, left, bottom, right), 1.0 - (bottom - top) * (right - left) / (gh * gw)


def swap_box(x: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """x (B, C, gh, gw) with the box replaced by the reversed batch's; applying it twice gives x back."""
    top, left, bottom, right = box
    out = x.clone()
    out[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
    return out


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """(1, 1 + gh * gw, d) with the class token in the middle -> the same layout on `new_grid` (bicubic)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    mid = old_grid[0] * old_grid[1] // 2
    cls_pos = pos_embed[:, mid : mid + 1]
    patches = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)
    patches = rearrange(patches, "1 (h w) d -> 1 d h w", h=old_grid[0])
    patches = F.interpolate(patches.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = rearrange(patches.to(pos_embed.dtype), "1 d h w -> 1 (h w) d")
    new_mid = new_grid[0] * new_grid[1] // 2
    return torch.cat([patches[:, :new_mid], cls_pos, patches[:, new_mid:]], dim=1)


class DeMansia2Net(nn.Module):
    """DeMansia 2 classifier: (B, in_chans, H, W) -> logits (B, num_classes), for any H, W divisible by 2 * patch_size.

    Tokens: the stem gives a (H / 2p) x (W / 2p) grid; the class token is inserted at index N // 2 of the N patch
    tokens; `pos_embed` (1, N + 1, d_model) learned at `img_size` and bicubic-resampled for other sizes. Layers:
    pre-norm residual blocks (RMSNorm eps 1e-5, fp32 residual, no MLP) whose mixer is `BidirectionalMamba2`, except
    `attn_layers` where it is `MHA` (non-causal, causal depthwise conv over q/k/v, partial rotary). `norm_f` then
    `head` on the class token and `aux_head` on the patch tokens; eval logits = head(cls) + aux_weight * max over
    tokens of aux_head(tokens). With num_classes=0 both heads are Identity and `forward` returns the normalised class
    token (B, d_model).

    distill_token (DeiT's hard distillation, `--set distill=hard`): a second learned token right after the class token
    (index N // 2 + 1; no position embedding of its own: a learned token needs none) with its own `head_dist`, trained
    on a teacher's argmax; eval logits then use DeiT's average (head(cls) + head_dist(dist)) / 2 in place of head(cls),
    and `pre_logits` the average of the two tokens. Off: the network and its state_dict are the released ones.

    scan_mode: "bidirectional" (the sequence scanned both ways) or "legacy" (the published channel-flip mixer, needed
    to run the released weights).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 8, in_chans: int = 3,
                 num_classes: int = 1000, d_model: int = 192, depth: int = 24, attn_layers: tuple[int, ...] = (10, 20),
                 num_heads: int = 3, attn_head_dim: int = 96, rotary_dim: int = 48, d_state: int = 128,
                 d_conv: int = 4, expand: int = 2, headdim: int = 48, chunk_size: int = 256,
                 scan_mode: str = "bidirectional", stem_channels: int = 64, drop_path_rate: float = 0.0,
                 aux_weight: float = 0.5, norm_eps: float = 1e-5, stem: str = "lvvit", distill_token: bool = False,
                 **_ignored: Any):
        super().__init__()
        if scan_mode not in ("bidirectional", "legacy"):
            raise ValueError(f"scan_mode must be 'bidirectional' or 'legacy', got {scan_mode!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if stem not in ("lvvit", "early_conv"):
            raise ValueError(f"stem must be 'lvvit' or 'early_conv', got {stem!r}")
        self.patch_embed = (ConvStem(in_chans, d_model, patch_size, stem_channels) if stem == "lvvit"
                            else EarlyConvStem(in_chans, d_model, 2 * patch_size, stem_channels))
        self.grid = (img_size[0] // self.patch_embed.stride, img_size[1] // self.patch_embed.stride)
        self.num_classes, self.num_features, self.embed_dim = num_classes, d_model, d_model
        self.aux_weight, self.depth = aux_weight, depth
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, d_model))
        self.num_prefix_tokens = 2 if distill_token else 1
        if distill_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))

        norm_cls = partial(RMSNorm, eps=norm_eps)
        mamba = partial(BidirectionalMamba2, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                        chunk_size=chunk_size, scan_mode=scan_mode)
        attn = partial(MHA, num_heads=num_heads, head_dim=attn_head_dim, d_conv=d_conv, rotary_emb_dim=rotary_dim,
                       causal=False, qkv_proj_bias=True, out_proj_bias=True)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # plain floats: meta-device safe
        self.attn_layers = tuple(attn_layers)
        self.layers = nn.ModuleList([
            Block(d_model, partial(attn if i in self.attn_layers else mamba, layer_idx=i), norm_cls,
                  residual_in_fp32=True, drop_path=dpr[i])
            for i in range(depth)
        ])
        self.norm_f = RMSNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        if distill_token:
            self.head_dist = nn.Linear(d_model, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=d_model, reduction=self.patch_embed.stride, module=f"layers.{i}")
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        # As published: lecun-normal stem convs, trunc-normal(0.02) heads and embeddings, zero Linear biases, and the
        # mixers' out_proj re-drawn kaiming-uniform / sqrt(depth) (GPT-2 style residual scaling).
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in (self.head, self.aux_head, getattr(self, "head_dist", None)):
            if isinstance(head, nn.Linear):
                trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.has_dist_token:
            trunc_normal_(self.dist_token, std=0.02)
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj /= math.sqrt(self.depth)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"} if self.has_dist_token else {"pos_embed", "cls_token"}

    @property
    def has_dist_token(self) -> bool:
        return self.num_prefix_tokens == 2

    # ----- tokens -----
    def token_grid(self, x: Tensor) -> tuple[int, int]:
        s = self.patch_embed.stride
        return x.shape[-2] // s, x.shape[-1] // s

    def embed(self, x: Tensor, box: tuple[int, int, int, int] | None = None) -> Tensor:
        """Image (B, C, H, W) -> tokens (B, N + 1, d_model) with the class token at N // 2 and positions added
        (with a distillation token (B, N + 2, d_model), that token at N // 2 + 1).

        `box` (MixToken): the stem's tokens inside the box come from the reversed batch.
        """
        x = self.patch_embed(x)
        if box is not None:
            x = swap_box(x, box)
        grid = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")
        mid = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1)
        x = x + resample_pos_embed(self.pos_embed, self.grid, tuple(grid)).to(x.dtype)
        if self.has_dist_token:
            x = torch.cat([x[:, : mid + 1], self.dist_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, mid + 1 :]],
                          dim=1)
        return x

    def forward_features(self, x: Tensor, box: tuple[int, int, int, int] | None = None) -> Tensor:
        """Image (B, C, H, W) -> normalised tokens (B, N + 1, d_model), class token at index N // 2."""
        hidden, residual = self.embed(x, box), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.norm_f(hidden, residual=residual, prenorm=False, residual_in_fp32=True)

    def split_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N + 1, d) -> class token (B, d), patch tokens (B, N, d) (a distillation token is left out)."""
        return self._split(x)[::2]

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(B, N + prefix, d) -> class token (B, d), distillation token (B, d) or None, patch tokens (B, N, d)."""
        prefix = self.num_prefix_tokens
        mid = (x.shape[1] - prefix) // 2
        dist = x[:, mid + 1] if prefix == 2 else None
        return x[:, mid], dist, torch.cat([x[:, :mid], x[:, mid + prefix :]], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N + 1, d) -> logits (B, num_classes) = head(cls) + aux_weight * max_t aux_head(tokens), with a
        distillation token (head(cls) + head_dist(dist)) / 2 + aux_weight * max_t aux_head(tokens);
        `pre_logits` (or num_classes=0): the class token (B, d) (with a distillation token, the mean of the two)."""
        cls, dist, tokens = self._split(x)
        if pre_logits or self.num_classes == 0:
            return cls if dist is None else (cls + dist) / 2
        logits = self.head(cls) if dist is None else (self.head(cls) + self.head_dist(dist)) / 2
        return logits + self.aux_weight * self.aux_head(tokens).amax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_train(self, x: Tensor, box: tuple[int, int, int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Training outputs: class logits (B, K) and token logits (B, N, K).

        With a MixToken `box` the token logits inside the box are swapped back to the image their patch came from,
        so they line up with each image's own (unmixed) dense targets; the class logits see the mixed image.
        """
        cls, aux, _ = self.forward_train_distill(x, box)
        return cls, aux

    def forward_train_distill(self, x: Tensor, box: tuple[int, int, int, int] | None = None,
                              ) -> tuple[Tensor, Tensor, Tensor | None]:
        """`forward_train`'s class logits (B, K) and token logits (B, N, K), and the distillation head's logits
        (B, K) (None without a distillation token)."""
        cls, dist, tokens = self._split(self.forward_features(x, box))
        aux = self.aux_head(tokens)
        if box is not None:
            gh, gw = self.token_grid(x)
            aux = rearrange(swap_box(rearrange(aux, "b (h w) k -> b k h w", h=gh, w=gw), box), "b k h w -> b (h w) k")
        return self.head(cls), aux, None if dist is None else self.head_dist(dist)

    # ----- timm -----
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        d = self.num_features
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        if self.has_dist_token:
            self.head_dist = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the residual stream after the chosen layers as (B, d_model, gh, gw) maps (class token
        removed); `indices` an int (the last n layers) or a list of layer indices; `norm` applies `norm_f`."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be NCHW or NLC")
        take = _take_indices(self.depth, indices)
        gh, gw = self.token_grid(x)
        hidden, residual, feats = self.embed(x), None, []
        last = max(take) if (stop_early or intermediates_only) else self.depth - 1
        for i, layer in enumerate(self.layers[: last + 1]):
            hidden, residual = layer(hidden, residual)
            if i in take:
                stream = self.norm_f(hidden, residual=residual) if norm else (hidden + residual).to(hidden.dtype)
                _, tokens = self.split_tokens(stream)
                feats.append(tokens if output_fmt == "NLC" else rearrange(tokens, "b (h w) d -> b d h w", h=gh, w=gw))
        if intermediates_only:
            return feats
        out = self.norm_f(hidden, residual=residual, prenorm=False, residual_in_fp32=True)
        return out, feats

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take = _take_indices(self.depth, indices)
        self.layers = self.layers[: max(take) + 1]
        self.depth = len(self.layers)
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


def _take_indices(depth: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        return list(range(depth - indices, depth))
    return [i % depth for i in indices]


def net_kwargs(cfg: DeMansia2Config) -> dict[str, Any]:
    """DeMansia2Net constructor arguments from a config."""
    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes, d_model=cfg.d_model,
                depth=cfg.depth, attn_layers=tuple(cfg.attn_layers), num_heads=cfg.num_heads,
                attn_head_dim=cfg.attn_head_dim, rotary_dim=cfg.rotary_dim, d_state=cfg.d_state, d_conv=cfg.d_conv,
                expand=cfg.expand, headdim=cfg.headdim, chunk_size=cfg.chunk_size, scan_mode=cfg.scan_mode,
                stem_channels=cfg.stem_channels, drop_path_rate=cfg.drop_path, aux_weight=cfg.aux_weight,
                stem=cfg.stem, distill_token=getattr(cfg, "distill", "none") != "none")


# ----------------------------------------------------------------------------------------------------------------------
# timm registration
# ----------------------------------------------------------------------------------------------------------------------
RELEASES = {  # the published weights (UPSTREAM.md "Released files"); `zoo.pretrained` reads these fields
    "tiny": dict(url="https://archive.org/download/DeMansia-2/DeMansia%202%20Tiny%20EMA.ckpt",
                 notes="file=DeMansia 2 Tiny EMA.ckpt", description="ImageNet-1k top-1 79.5% / top-5 94.4% "
                 "(published, EMA, 224px)", origin_url="https://github.com/catalpaaa/DeMansia-2"),
}
RELEASE_PRESET = "tiny,published"  # the released Tiny is the published network (legacy channel-flip mixer)


def _cfg(preset: str) -> dict[str, Any]:
    cfg = DeMansia2Config.from_presets(preset)
    size = cfg.image_size
    return dict(url="", num_classes=cfg.num_classes, input_size=(3, size, size), pool_size=None,
                crop_pct=cfg.crop_pct, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                first_conv="patch_embed.conv1" if cfg.stem == "lvvit" else "patch_embed.stages.0.0", classifier="head",
                license="apache-2.0") | RELEASES.get(preset, {})


default_cfgs = generate_default_cfgs({f"demansia2_{p}": _cfg(p) for p in ("micro", "tiny", "small")})


def _create(variant: str, preset: str, pretrained: bool = False, **kwargs: Any) -> DeMansia2Net:
    released = pretrained and preset in RELEASES
    args = {**net_kwargs(DeMansia2Config.from_presets(RELEASE_PRESET if released else preset)), **kwargs}
    # features_only: the residual stream of the last 3 layers (or `out_indices`) as (B, d_model, H/16, W/16) maps.
    model = build_model_with_cfg(DeMansia2Net, variant, False, **args,
                                 feature_cfg=dict(feature_cls="getter", out_indices=3))
    if pretrained:
        if not released:
            raise ZooError(f"{variant} has no released weights; demansia2_tiny has (the published Tiny EMA).")
        if kwargs.get("features_only"):
            raise ZooError(f"{variant}: pretrained=True with features_only is not supported; build the classifier "
                           f"and use forward_intermediates.")
        from zoo.pretrained import load_pretrained

        if kwargs.get("num_classes") in (None, 1000):
            load_pretrained(model, variant, _cfg(preset), released_state)
        else:
            _load_without_heads(model, variant, _cfg(preset))
    return model


def _load_without_heads(model: DeMansia2Net, variant: str, cfg: dict[str, Any]) -> None:
    """Released weights for a network with another class count: everything but `head` / `aux_head`."""
    from zoo.pretrained import pretrained_state

    state = {k: v for k, v in pretrained_state(variant, cfg, released_state).items()
             if not k.startswith(("head.", "aux_head."))}
    model.load_state_dict(state, strict=False)


@register_model
def demansia2_micro(pretrained: bool = False, **kwargs: Any) -> DeMansia2Net:
    """CPU-sized DeMansia 2 (the zoo's demo preset), 64x64 input."""
    return _create("demansia2_micro", "micro", pretrained, **kwargs)


@register_model
def demansia2_tiny(pretrained: bool = False, **kwargs: Any) -> DeMansia2Net:
    """DeMansia 2 Tiny (d_model 192, 24 layers, 9.5M parameters), 224x224 input."""
    return _create("demansia2_tiny", "tiny", pretrained, **kwargs)


@register_model
def demansia2_small(pretrained: bool = False, **kwargs: Any) -> DeMansia2Net:
    """DeMansia 2 Small (d_model 384, 24 layers, 32.7M parameters), 224x224 input."""
    return _create("demansia2_small", "small", pretrained, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# The released checkpoint's tensors, checked against this network
# ----------------------------------------------------------------------------------------------------------------------
def checked_state(ckpt: dict[str, Any], src: str | Path) -> tuple[dict[str, torch.Tensor], DeMansia2Config]:
    """The released network's state_dict (DeMansia2Net names) and config, after checking every key and shape against
    a network built from the released hyper-parameters. Raises ZooError naming missing / unexpected / misshapen keys."""
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in ckpt["state_dict"].items()
             if isinstance(v, torch.Tensor)}
    from models.demansia2.release import config_from_released
    from models.demansia2.release import short_list as _short

    cfg = config_from_released(ckpt.get("hyper_parameters") or {})
    with torch.device("meta"):
        expected = DeMansia2Net(**net_kwargs(cfg)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ZooError(f"{src}: the keys do not match a DeMansia 2 ({cfg.d_model} wide, {cfg.depth} layers, attention at "
                       f"{list(cfg.attn_layers)}). Missing: {_short(missing)}. Unexpected: {_short(unexpected)}.")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ZooError(f"{src}: shape mismatch for {_short(wrong)}.")
    return state, cfg


def released_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The released file as `demansia2_tiny(pretrained=True)`'s state_dict (`zoo.pretrained` caches it)."""
    from models.demansia2.release import read_released

    return checked_state(read_released(path), path)[0]
