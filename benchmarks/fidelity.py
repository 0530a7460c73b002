"""Parity with upstream's code: each published network built from upstream's own code (fetched, outside the repo) and
from the zoo, the same weights in both (upstream's init, every tensor nudged off it), the same input, and the max
relative error of each output. Results and commands: docs/fidelity.md.

    python benchmarks/fidelity.py vmamba_v0 /tmp/fid/vmamba_v0 --size tiny      # VMamba @b2faf50, v0 code
    python benchmarks/fidelity.py vmamba /tmp/fid/vmamba_head --size small      # VMamba today, vanilla_vmamba_*
    python benchmarks/fidelity.py sum /tmp/fid/sum                              # SUM's decoder vs UNetDecoder
    python benchmarks/fidelity.py demansia2 /tmp/fid/demansia2                  # DeMansia 2 Tiny, legacy mixer
    python benchmarks/fidelity.py face /tmp/fid/face                            # FaceRegSMM RecSSM
    python benchmarks/fidelity.py agegender /tmp/fid/agegender                  # age/gender heads
    python benchmarks/fidelity.py palm /tmp/fid/palm                            # zebracon7's create_model
    python benchmarks/fidelity.py vmamba_v0 /tmp/fid/vmamba_v0 --record        # the constants of test_vmamba_v0

The upstream path is an export of upstream's repository at the commit in docs/fidelity.md (`git archive`); its code
runs from there and is never copied into the project. Where upstream needs CUDA kernels the pure-PyTorch path runs
instead: mamba-ssm's `*_ref` (its CUDA extensions replaced by empty stand-in modules, as tests/conftest.py does) and
VMamba's `selective_scan_torch`. Error = max |ours - theirs| / max |theirs| over the whole output, float32, CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

import torch
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def stand_in(*names: str) -> None:
    """Empty modules for compiled extensions upstream imports at load time (never called on these paths)."""
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))


def mamba_ssm_refs() -> types.SimpleNamespace:
    """mamba-ssm importable without its CUDA extensions; its modules then take their reference paths."""
    stand_in("selective_scan_cuda", "causal_conv1d_cuda")
    import mamba_ssm.modules.mamba2 as m2
    import mamba_ssm.modules.mamba_simple as m1
    import mamba_ssm.ops.selective_scan_interface as ssi

    for mod in (m1, m2, ssi):
        for fn in ("causal_conv1d_fn", "causal_conv1d_update"):
            if hasattr(mod, fn):
                setattr(mod, fn, None)
    return types.SimpleNamespace(m1=m1, m2=m2, ssi=ssi)


def load_file(name: str, path: str) -> types.ModuleType:
    """Import one upstream source file as module `name` (its folder first on sys.path for its own imports)."""
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def nudge(state: dict[str, Tensor], seed: int = 0, scale: float = 0.1) -> dict[str, Tensor]:
    """Every float tensor moved off its init: + scale * std (or scale, for constant tensors) * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            s = v.float().std().item() if v.numel() > 1 else 0.0
            s = s if s > 1e-8 else 1.0
            v = v + scale * s * torch.randn(v.shape, generator=g, dtype=v.dtype)
        out[k] = v
    return out


def rel_err(ours: Tensor, theirs: Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, (tuple(ours.shape), tuple(theirs.shape))
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


def table(title: str, rows: list[tuple[str, Tensor, Tensor]]) -> float:
    print(f"\n{title}")
    print("| output | shape | max rel err |\n|---|---|---|")
    worst = 0.0
    for name, ours, theirs in rows:
        e = rel_err(ours, theirs)
        worst = max(worst, e)
        print(f"| {name} | {tuple(theirs.shape)} | {e:.1e} |")
    return worst


def capture(modules: dict[str, nn.Module]) -> tuple[dict[str, Tensor], list]:
    """Forward hooks storing each module's output under its name."""
    got: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, k=k: got.__setitem__(k, out)) for k, m in modules.items()]
    return got, handles


def parse_hw(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


# ----------------------------------------------------------------------------------------------------------------------
# VMamba v0 (classification), the v0 code of b2faf50 or today's vanilla_vmamba_*
# ----------------------------------------------------------------------------------------------------------------------
V0_DEPTHS = {"tiny": [2, 2, 9, 2], "small": [2, 2, 27, 2]}


def upstream_vmamba_v0(path: str, depths, dims, d_state: int) -> nn.Module:
    """VMamba's v0 VSSM (classification/models/vmamba/vmamba.py @b2faf50) with mamba-ssm's selective_scan_ref."""
    refs = mamba_ssm_refs()
    mod = load_file("upstream_vmamba_v0", os.path.join(path, "classification/models/vmamba/vmamba.py"))
    mod.selective_scan_fn = refs.ssi.selective_scan_ref  # SS2D binds this name at construction
    return mod.VSSM(depths=list(depths), dims=dims, d_state=d_state, num_classes=1000, drop_path_rate=0.0).eval()


def upstream_vmamba_head(path: str, size: str) -> nn.Module:
    """VMamba's current `vanilla_vmamba_{size}` (classification/models/vmamba.py), `selective_scan_torch`."""
    stand_in("fvcore", "fvcore.nn")
    fv = sys.modules["fvcore.nn"]
    for name in ("FlopCountAnalysis", "flop_count_str", "flop_count", "parameter_count"):
        setattr(fv, name, None)
    sys.modules["fvcore"].nn = fv
    models_dir = os.path.join(path, "classification/models")
    sys.path.insert(0, models_dir)
    mod = load_file("upstream_vmamba_head", os.path.join(models_dir, "vmamba.py"))
    net = getattr(mod, f"vanilla_vmamba_{size}")().eval()
    return net


def upstream_vmamba_parts(net: nn.Module) -> dict[str, nn.Module]:
    """The module after which each stage's output (before merging) is ready, in upstream's VSSM of either code."""
    parts = {}
    for i, layer in enumerate(net.layers):
        blocks = layer.blocks
        parts[f"stage {i + 1}"] = blocks[-1]
    return parts


def run_vmamba(args: argparse.Namespace) -> None:
    from models.blocks import vmamba_key_map
    from models.vmamba import VMambaV0

    torch.manual_seed(0)
    h, w = parse_hw(args.input)
    if args.record:  # the small fixed config of tests/test_vmamba_v0.py
        depths, dims, d_state = [1, 1, 2, 1], 16, 8
    else:
        depths, dims, d_state = V0_DEPTHS[args.size], 96, 16
    ours = VMambaV0(dims, tuple(depths), d_state, num_classes=1000).eval()
    if args.which == "vmamba_v0":
        theirs = upstream_vmamba_v0(args.upstream, depths, dims, d_state)
        if args.record:  # weights the test draws itself
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from test_vmamba_v0 import v0_weights

            drawn = v0_weights(ours)
            state = {k: drawn[vmamba_key_map({k: None}).popitem()[0]] for k in theirs.state_dict()}
        else:
            state = nudge(theirs.state_dict())
        theirs.load_state_dict(state)
        mapped = vmamba_key_map(state)
    else:
        theirs = upstream_vmamba_head(args.upstream, args.size)
        state = nudge(theirs.state_dict())
        theirs.load_state_dict(state)
        mapped = vmamba_head_key_map(state)
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, h, w, generator=g)
    got, handles = capture(upstream_vmamba_parts(theirs))
    with torch.no_grad():
        logits_t = theirs(x)
        pooled_t = theirs.forward_features(x) if args.which == "vmamba_v0" else _head_pooled(theirs, got)
        outs, _ = ours.stages(x)
        pooled_o = ours.forward_head(outs[-1], pre_logits=True)
        logits_o = ours.forward_head(outs[-1])
    for hd in handles:
        hd.remove()
    rows = [(f"stage {i + 1}", o, got[f"stage {i + 1}"]) for i, o in enumerate(outs)]
    rows += [("pooled feature", pooled_o, pooled_t), ("logits", logits_o, logits_t)]
    label = "record config" if args.record else args.size
    table(f"{args.which} {label}, input {h}x{w}, depths {depths}", rows)
    if args.record:
        print("\n# constants for tests/test_vmamba_v0.py (VMamba's own outputs)")
        print(f"LOGITS_SUM = {logits_t.double().sum().item()!r}")
        print(f"LOGITS_ABS_SUM = {logits_t.double().abs().sum().item()!r}")
        print(f"LOGITS_FIRST = {[round(v, 6) for v in logits_t[0, :6].tolist()]!r}")
        print(f"POOLED_FIRST = {[round(v, 6) for v in pooled_t[0, :6].tolist()]!r}")
        print(f"STAGE4_ABS_SUM = {got['stage 4'].double().abs().sum().item()!r}")


def _head_pooled(net: nn.Module, got: dict[str, Tensor]) -> Tensor:
    """Today's VSSM: classifier = norm, permute, avgpool, flatten, head; the pooled feature is the head's input."""
    cls = net.classifier
    x = got["stage 4"]
    with torch.no_grad():
        for name, m in cls.named_children():
            if name == "head":
                break
            x = m(x)
    return x


def vmamba_head_key_map(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Today's vanilla VSSM names -> ours: blocks `norm` / `op` (`vmamba_key_map`), `patch_embed.0` / `.2` (conv,
    LayerNorm), `classifier.norm` / `classifier.head`; `downsample.{norm,reduction}` are already ours."""
    from models.blocks import vmamba_key_map

    out = {}
    for k, v in vmamba_key_map(state).items():
        k = k.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        out[k.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")] = v
    return out


# ----------------------------------------------------------------------------------------------------------------------
# SUM's decoder (Arhosseini77/SUM net/models/vmamba.py) vs models.hand.model.UNetDecoder
# ----------------------------------------------------------------------------------------------------------------------
def run_sum(args: argparse.Namespace) -> None:
    """SUM's VSSM as its config builds it (encoder depths 2/2/9/2, decoder 2/2/2/1, one output channel); the decoder
    (`forward_features_up` + `forward_final`) run on the same encoder stage outputs / inputs as ours. SUM's
    condition modulation (C-VSS, its saliency datasets' prompt) is switched off: the hand project names the plain
    U-Net (docs/hand.md), and with `use_modulation = False` SUM's block is the VSS block."""
    from models.blocks import vmamba_key_map
    from models.hand.model import UNetDecoder

    refs = mamba_ssm_refs()
    mod = load_file("upstream_sum_vmamba", os.path.join(args.upstream, "net/models/vmamba.py"))
    mod.selective_scan_fn = refs.ssi.selective_scan_ref  # forward_corev0 binds this name at each call
    torch.manual_seed(0)
    theirs = mod.VSSM(num_classes=1, depths=[2, 2, 9, 2], depths_decoder=[2, 2, 2, 1], drop_path_rate=0.0).eval()
    for m in theirs.modules():
        if hasattr(m, "use_modulation"):
            m.use_modulation = False
    state = nudge(theirs.state_dict())
    theirs.load_state_dict(state)
    dec = {k: v for k, v in vmamba_key_map(state).items()
           if k.startswith(("layers_up.", "final_")) and ".condition" not in k and ".mlp." not in k}
    ours = UNetDecoder([96, 192, 384, 768], (2, 2, 2, 1), 16, out_chans=1).eval()
    ours.load_state_dict(dec, strict=True)

    h, w = parse_hw(args.input)
    g = torch.Generator().manual_seed(1)
    sizes = [(h // 4 * 2**-i, w // 4 * 2**-i, 96 * 2**i) for i in range(4)]
    ins = [torch.randn(1, int(a), int(b), c, generator=g) for a, b, c in sizes]
    outs = [torch.randn(1, int(a), int(b), c, generator=g) for a, b, c in sizes]
    cond = torch.eye(4)[:1]
    got, handles = capture({f"decoder stage {i + 1}": m for i, m in enumerate(theirs.layers_up)})
    with torch.no_grad():
        dense_t = theirs.forward_final(theirs.forward_features_up(outs[-1], ins, cond))
        feats, dense_o = ours(outs, ins)
    for hd in handles:
        hd.remove()
    rows = [(f"decoder stage {i + 1}", f, got[f"decoder stage {i + 1}"]) for i, f in enumerate(feats)]
    rows.append(("dense logits", dense_o, dense_t))
    table(f"SUM decoder (depths 2/2/2/1) vs UNetDecoder, encoder maps of a {h}x{w} image", rows)


# ----------------------------------------------------------------------------------------------------------------------
# DeMansia 2 Tiny (catalpaaa/DeMansia-2 model.py + bidirectional_mamba_2.py), the released network, legacy mixer
# ----------------------------------------------------------------------------------------------------------------------
class _Rotary(nn.Module):
    """Stand-in for flash-attn's `RotaryEmbedding` (flash-attn is not installed; mamba-ssm's MHA calls it as
    `rotary_emb(q, kv, seqlen_offset=, max_seqlen=)`): non-interleaved rotate-half on the first `dim` channels of each
    head of q and k, angles position * base^(-2i/dim)."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, **_):
        super().__init__()
        assert not interleaved
        self.dim, self.base = dim, base

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = self.dim // 2
        x1, x2, rest = x[..., :half], x[..., half:self.dim], x[..., self.dim:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)

    def forward(self, q: Tensor, kv: Tensor, seqlen_offset: int = 0, max_seqlen=None):
        pos = torch.arange(seqlen_offset, seqlen_offset + q.shape[1], dtype=torch.float32)
        inv = 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        ang = torch.outer(pos, inv)[None, :, None]  # (1, L, 1, dim/2)
        cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
        k, v = kv.unbind(dim=2)
        return self._rotate(q, cos, sin), torch.stack([self._rotate(k, cos, sin), v], dim=2)


def run_demansia2(args: argparse.Namespace) -> None:
    """DeMansia 2 Tiny as published (model.py `DeMansia_2(**DeMansia_2_tiny_config)`, device None) vs
    `DeMansia2Config.from_presets("tiny,published")`. bidirectional_mamba_2.py does not import as published (line 1
    starts with a stray `i`): it is loaded with that one character removed. mamba-ssm's kernels -> references:
    `mamba_split_conv1d_scan_combined` -> `mamba_split_conv1d_scan_ref` (its conv `causal_conv1d_ref`, its scan
    `selective_scan_ref`, its gated norm `rms_norm_ref`), `Block`/`norm_f` unfused with `RMSNorm` = `rms_norm_ref`,
    MHA's depthwise conv through torch (causal_conv1d_fn = None), flash-attn's rotary by `_Rotary`."""
    import dataclasses

    # ours, imported before upstream's folder (with its own model_config.py) goes on the path
    from model_config import DeMansia2Config
    from models.demansia2.module import DeMansia2

    flash = types.ModuleType("flash_attn.layers.rotary")
    flash.RotaryEmbedding = _Rotary
    for name in ("flash_attn", "flash_attn.layers"):
        stand_in(name)
    sys.modules["flash_attn.layers.rotary"] = flash
    mamba2_refs()
    import causal_conv1d.causal_conv1d_interface as cc
    import mamba_ssm.modules.mha as mha
    import mamba_ssm.ops.selective_scan_interface as ssi
    import mamba_ssm.ops.triton.layer_norm as ln
    import mamba_ssm.ops.triton.ssd_combined as ssd
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref as gated_ref

    mha.RotaryEmbedding, mha.causal_conv1d_fn = _Rotary, None
    ssi.selective_scan_fn = ssi.selective_scan_ref
    ssd.causal_conv1d_fn = lambda x, w, b=None, activation=None: cc.causal_conv1d_ref(x, w, b, activation=activation)
    ssd.rmsnorm_fn = gated_ref
    ln.RMSNorm.forward = lambda self, x, residual=None, prenorm=False, residual_in_fp32=False: ln.rms_norm_ref(
        x, self.weight, None, residual=residual, eps=self.eps, prenorm=prenorm, upcast=True)

    src = open(os.path.join(args.upstream, "bidirectional_mamba_2.py")).read()
    assert src.startswith("i#")
    bm2 = types.ModuleType("bidirectional_mamba_2")
    bm2.__file__ = os.path.join(args.upstream, "bidirectional_mamba_2.py")
    exec(compile(src[1:], bm2.__file__, "exec"), bm2.__dict__)
    sys.modules["bidirectional_mamba_2"] = bm2

    def split_ref(*a, seq_idx=None, **k):
        return ssd.mamba_split_conv1d_scan_ref(*a, **k)

    bm2.mamba_split_conv1d_scan_combined = split_ref
    sys.path.insert(0, args.upstream)
    up = load_file("upstream_demansia2_model", os.path.join(args.upstream, "model.py"))
    up_cfg = load_file("upstream_demansia2_config", os.path.join(args.upstream, "model_config.py"))
    hp = dataclasses.asdict(up_cfg.DeMansia_2_tiny_config())
    hp.update(device=None)
    torch.manual_seed(0)
    theirs = up.DeMansia_2(**hp).eval()
    theirs.fused_add_norm = False
    for blk in theirs.layers:
        blk.fused_add_norm = False
    state = nudge({k: v for k, v in theirs.state_dict().items() if not k.startswith(("valid_acc", "token_loss"))})
    theirs.load_state_dict(state, strict=False)

    ours = DeMansia2(config=DeMansia2Config.from_presets("tiny,published")).net.eval()
    own = ours.state_dict()
    missing = sorted(set(own) - set(state))
    assert not missing, missing[:8]
    ours.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tok_t = theirs(x, return_features=True)
        logits_t = theirs(x)
        got, handles = capture({"norm_f": ours.norm_f})
        logits_o = ours(x)
        for hd in handles:
            hd.remove()
    rows = [("final tokens (norm_f)", got["norm_f"], tok_t), ("eval logits", logits_o, logits_t)]
    table("DeMansia 2 Tiny (published, legacy mixer), two 224x224 images", rows)


# ----------------------------------------------------------------------------------------------------------------------
# Face (FaceRegSMM RecSSM), age/gender heads, palm (denoising-diffusion-pytorch)
# ----------------------------------------------------------------------------------------------------------------------
def mamba2_refs() -> None:
    """mamba-ssm's Mamba2 on its reference path: the chunk scan = `ssd_minimal_discrete` (wrapped with the kernel's
    signature), the gated RMSNorm = `rms_norm_ref`, the conv = F.conv1d (as benchmarks/scan.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import _import_mamba_ssm_refs
    from test_blocks_support import ssd_minimal_scan

    ref = _import_mamba_ssm_refs()
    sys.modules["mamba_ssm.modules.mamba2"].mamba_chunk_scan_combined = ssd_minimal_scan(ref.ssd_minimal_discrete)
    ref.layernorm_gated.rmsnorm_fn = ref.gated_rms_norm_ref


def run_face(args: argparse.Namespace) -> None:
    """FaceRegSMM's RecSSM (src/models/model.py; configs/train.yaml: 128 px, patch 8) vs face `published`."""
    from model_config import FaceConfig
    from models.face.model import FaceEmbeddingNet, upstream_state_dict_to_zoo

    mamba2_refs()
    mod = load_file("upstream_face_model", os.path.join(args.upstream, "src/models/model.py"))
    torch.manual_seed(0)
    theirs = mod.RecSSM(img_size=128, patch_size=8, embed_dim=128).eval()
    for m in theirs.ssm_blocks:
        m.use_mem_eff_path = False  # the fused Triton path; the split path runs the references above
    state = nudge(theirs.state_dict())
    theirs.load_state_dict(state)
    ours = FaceEmbeddingNet(FaceConfig.from_presets("published")).eval()
    ours.load_state_dict({k.removeprefix("net."): v for k, v in upstream_state_dict_to_zoo(state).items()})
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    got, handles = capture({"final norm": theirs.final_norm, "pooled (head input)": theirs.head})
    got_o, handles_o = capture({"final norm": ours.encoder.final_norm, "pooled (head input)": ours.head})
    with torch.no_grad():
        emb_t, emb_o = theirs(x), ours(x)
    for hd in handles + handles_o:
        hd.remove()
    rows = [("final norm (tokens)", got_o["final norm"], got["final norm"]),
            ("head output (pre-L2)", got_o["pooled (head input)"], got["pooled (head input)"]),
            ("embedding", emb_o, emb_t)]
    table("FaceRegSMM RecSSM vs face published, two 128x128 images", rows)


def run_agegender(args: argparse.Namespace) -> None:
    """demographic-analysis ai/age_gender/model.py AgeGenderModel(efficientnet_b0) vs agegender `published`."""
    from model_config import AgeGenderConfig
    from models.agegender.module import AgeGender

    mod = load_file("upstream_agegender_model", os.path.join(args.upstream, "ai/age_gender/model.py"))
    torch.manual_seed(0)
    theirs = mod.AgeGenderModel("efficientnet_b0", pretrained=False).eval()
    state = nudge(theirs.state_dict())
    theirs.load_state_dict(state)
    ours = AgeGender(AgeGenderConfig.from_presets("published").replace(pretrained=False)).eval()
    mapped = {}
    for k, v in state.items():  # heads: upstream Linear/ReLU/Linear/Sigmoid, ours Dropout/Linear/ReLU/Linear
        k = "net." + k[len("backbone."):] if k.startswith("backbone.") else k  # our network attribute is `net`
        for head in ("age_head.", "gender_head."):
            if k.startswith(head):
                i, rest = k[len(head):].split(".", 1)
                k = f"{head}{int(i) + 1}.{rest}"
        mapped[k] = v
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and all(not k.startswith(("net.", "age_head.", "gender_head.")) for k in missing), \
        (missing, unexpected)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats_t, feats_o = theirs.backbone(x), ours.net(x)
        age_t, gender_t = theirs(x)
        age_o, logit_o = ours(x)
    rows = [("backbone features", feats_o, feats_t), ("age (years)", age_o, age_t.squeeze(-1)),
            ("gender P(female)", torch.sigmoid(logit_o), gender_t.squeeze(-1))]
    table("age/gender heads on efficientnet_b0, two 224x224 images", rows)


def run_palm(args: argparse.Namespace) -> None:
    """zebracon7's network (src/model.py `create_model`: Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=3),
    GaussianDiffusion(image_size=128, timesteps=1000, sampling_timesteps=1000, objective="pred_noise"), the installed
    denoising-diffusion-pytorch's other defaults) vs palm `published` (models.palm.model.build_diffusion)."""
    from model_config import PalmConfig
    from models.palm.model import build_diffusion

    torch.manual_seed(0)
    if args.upstream:  # upstream's own builder, src/model.py create_model
        theirs = load_file("upstream_palm_model", os.path.join(args.upstream, "src/model.py")).create_model("cpu")
    else:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet

        theirs = GaussianDiffusion(Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=3), image_size=128, timesteps=1000,
                                   sampling_timesteps=1000, objective="pred_noise")
    theirs.eval()
    ours = build_diffusion(PalmConfig.from_presets("published")).eval()
    buffers_t, buffers_o = dict(theirs.named_buffers()), dict(ours.named_buffers())
    assert buffers_t.keys() == buffers_o.keys()
    rows = [(f"schedule {k}", buffers_o[k], buffers_t[k]) for k in ("betas", "alphas_cumprod", "loss_weight")]
    state = nudge({k: v for k, v in theirs.state_dict().items() if k not in buffers_t})
    theirs.load_state_dict(state, strict=False)
    ours.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 128, 128, generator=g)
    t = torch.tensor([10, 700])
    noise = torch.randn(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        rows.append(("Unet output", ours.model(x * 2 - 1, t), theirs.model(x * 2 - 1, t)))
        rows.append(("training loss (fixed t, noise)", ours.p_losses(x * 2 - 1, t, noise),
                     theirs.p_losses(x * 2 - 1, t, noise)))
        torch.manual_seed(2)
        step_o = ours.p_sample(noise, 700)[0]
        torch.manual_seed(2)
        step_t = theirs.p_sample(noise, 700)[0]
        rows.append(("one DDPM step (t = 700)", step_o, step_t))
    table("palm published vs denoising-diffusion-pytorch as upstream builds it, two 128x128 images", rows)


# ----------------------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["vmamba_v0", "vmamba", "sum", "demansia2", "face", "agegender", "palm"])
    p.add_argument("upstream", nargs="?", default="", help="upstream export (git archive) at the recorded commit")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--input", default="64x96", help="H x W of the test image")
    p.add_argument("--record", action="store_true", help="vmamba_v0: the small config whose numbers the tests keep")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runners = {"vmamba_v0": run_vmamba, "vmamba": run_vmamba, "sum": run_sum, "face": run_face,
               "agegender": run_agegender, "palm": run_palm, "demansia2": run_demansia2}
    runners[args.which](args)


if __name__ == "__main__":
    main()
