"""VMamba v0's release files: where they are (`RELEASES`) and how their tensors load (`load_vmamba_v0`).

A release `.pth` holds `model` (and `model_ema`, `optimizer`, `lr_scheduler`, `epoch`, `max_accuracy`, `config`);
its `model` state_dict names the block tensors `layers.i.blocks.j.ln_1.*` / `...self_attention.*`, which
`models.blocks.vmamba_key_map` renames to our `norm.*` / `mixer.*`; every other name and every shape is VMamba's.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from models.blocks import vmamba_key_map

_RELEASE_URL = "https://github.com/MzeroMiko/VMamba/releases/download/%23v0cls/"
# The v0 classifier releases (VMamba assets/performance.md; sizes and sha256 from the git-lfs pointers of a public
# repository that vendors the files). ImageNet-1k top-1 at 224^2; Small's log is its EMA run.
RELEASES: dict[str, dict[str, Any]] = {
    "tiny": dict(file="vssmtiny_dp01_ckpt_epoch_292.pth", url=_RELEASE_URL + "vssmtiny_dp01_ckpt_epoch_292.pth",
                 bytes=91_649_482, sha256="dbc0cc4f5ec0e45db5fba7c939d2c7d9b617e891ac10766912a8d604c37c5e47",
                 metric="ImageNet-1k top-1 82.2% (224x224)", license="mit"),
    "small": dict(file="vssmsmall_dp03_ckpt_epoch_238.pth", url=_RELEASE_URL + "vssmsmall_dp03_ckpt_epoch_238.pth",
                  bytes=177_830_070, sha256="8a9b3d3954bd28265405bd9a86768599d11491ba414ce04011db837d6c319e14",
                  metric="ImageNet-1k top-1 83.5% (224x224)", license="mit"),
}


def load_vmamba_v0(encoder: nn.Module, source: Any, ema: bool = False) -> dict[str, list[str]]:
    """Load VMamba v0 weights into `encoder` (a `VMambaV0`) through `vmamba_key_map`: a release file, read as data
    (`zoo.checkpoint.read_state_dict`: foreign classes such as its yacs config become inert placeholders), whose
    `model` entry is used (`model_ema` with `ema`); or a state_dict. Returns {"missing": [...], "unexpected": [...],
    "mismatched": [...]}: the encoder keys not loaded, the checkpoint keys not used (e.g. `head.*` for another class
    count), and those with a different shape (skipped)."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from zoo.checkpoint import read_state_dict

        state = read_state_dict(source, ("model_ema", "model") if ema else ("model",), "pretrained_ckpt")
    else:
        state = source
    state: dict[str, Tensor] = vmamba_key_map({k.removeprefix("module."): v for k, v in state.items()})
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {"missing": sorted(set(own) - set(usable)), "unexpected": sorted(set(state) - set(own)),
              "mismatched": sorted(k for k in state if k in own and own[k].shape != state[k].shape)}
    encoder.load_state_dict(usable, strict=False)
    return report


def vmamba_v0_release_state(path: Any) -> dict[str, Tensor]:
    """A VMamba v0 release file's `model` entry under our names (`zoo.pretrained` converts and caches it once)."""
    from zoo.checkpoint import read_state_dict

    return vmamba_key_map(read_state_dict(path, ("model",), "VMamba v0 release"))
