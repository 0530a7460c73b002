"""Open the hand project's trained model (Avir-AI/hand_identification_mamba, `best.pth`) as this zoo's hand model.

Its `train.py` saves `torch.save(model.state_dict(), path)` of `FullyConnectedNetwork`: the frozen SUM network as
`sum_model.salu_mamba.*` (VMamba v0 encoder names `patch_embed`, `layers.i.blocks.j.{ln_1,self_attention}`,
`layers.i.downsample`; plus SUM's decoder `layers_up.*`, `final_up`, `final_conv`, never run by its forward) and
three heads `fc{1,2,3}_{k}` / `bn{1,2}_{k}` for k = 1 identity, 2 age group, 3 gender. Our `head="published"` network
(`--preset published`) computes the same: sigmoid on the last encoder stage, flattened, into three `MLPHead`s
(`net.0` Linear, `net.1` BN, `net.4` Linear, `net.5` BN, `net.8` Linear). The encoder size comes from its depths
and width, the image size from the first head layer's input width, the class counts from the last layers; the file
has no names for the identities (upstream's label encoder sorted the subject ids: index i = i-th smallest id).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

RELEASE = dict(  # `predict.py --ckpt release:hand` (zoo.pretrained: downloaded once through gdown, then cached)
    url="https://drive.google.com/uc?id=1Te6sOMhBtbSUTqDzwWGTPkuPiS8cdZtB", notes="file=best.pth",
    license="none stated", description="11k Hands identity / age group / gender (no figures published)",
    origin_url="https://github.com/Avir-AI/hand_identification_mamba")
PREFIX = "sum_model.salu_mamba."
HEADS = {1: "identity_head", 2: "age_head", 3: "gender_head"}
LAYERS = {"fc1": 0, "bn1": 1, "fc2": 4, "bn2": 5, "fc3": 8}


def is_hand_release(raw: Any) -> bool:
    return isinstance(raw, dict) and "fc3_1.weight" in raw and any(str(k).startswith(PREFIX) for k in raw)


def _encoder_size(state: dict[str, torch.Tensor]) -> str:
    from models.hand.model import ENCODERS

    width = state["patch_embed.proj.weight"].shape[0]
    depths = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))),
                           default=-1) for i in range(4))
    for name, spec in ENCODERS.items():
        if spec["embed_dim"] == width and tuple(spec["depths"]) == depths:
            return name
    raise ZooError(f"its encoder (width {width}, depths {list(depths)}) is none of the VMamba v0 sizes "
                   f"{ {k: (v['embed_dim'], v['depths']) for k, v in ENCODERS.items()} }")


def from_release(raw: Any, path: str | Path) -> dict[str, Any] | None:
    """A zoo checkpoint dict (task hand, `published` head) for `best.pth` (None when `raw` is not one)."""
    if not is_hand_release(raw):
        return None
    from model_config import HandConfig
    from models.blocks import vmamba_key_map
    from models.hand.module import HandBiometrics

    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    encoder = vmamba_key_map({k[len(PREFIX):]: v for k, v in tensors.items()
                              if k.startswith(PREFIX + "patch_embed.") or k.startswith(PREFIX + "layers.")})
    try:
        size = _encoder_size(encoder)
    except (ZooError, KeyError) as e:
        raise ZooError(f"{path}: {e}") from None
    flat = tensors["fc1_1.weight"].shape[1]
    side = round((flat / encoder["layers.3.blocks.0.norm.weight"].shape[0]) ** 0.5)
    n_gender = tensors["fc3_3.weight"].shape[0]
    cfg = HandConfig.from_presets("published").replace(  # the file holds the whole network: no encoder release
        pretrained=False, encoder=size, image_size=32 * side, num_identities=tensors["fc3_1.weight"].shape[0],
        num_age_groups=tensors["fc3_2.weight"].shape[0],
        gender_names=("female", "male") if n_gender == 2 else tuple(str(i) for i in range(n_gender)))
    state = {f"net.encoder.{k}": v for k, v in encoder.items()}
    for k, v in tensors.items():
        if m := re.fullmatch(r"(fc[123]|bn[12])_([123])\.(.+)", k):
            state[f"net.{HEADS[int(m.group(2))]}.net.{LAYERS[m.group(1)]}.{m.group(3)}"] = v
    with torch.device("meta"):
        expected = HandBiometrics(config=cfg).state_dict()
    for k in ("net.encoder.norm.weight", "net.encoder.norm.bias"):  # SUM has no final norm; the published head
        if k in expected and k not in state:  # never reads it: an identity LayerNorm keeps the model complete
            state[k] = torch.ones(expected[k].shape) if k.endswith("weight") else torch.zeros(expected[k].shape)
    missing = [k for k in expected if k not in state and k != "threshold"]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        raise ZooError(f"{path}: does not fit the published hand network ({size} encoder, {cfg.image_size}px): "
                       f"missing {missing[:4]}, other shapes {wrong[:4]}.")
    return {"state_dict": {k: v for k, v in state.items() if k in expected},
            "hyper_parameters": {"task": "hand", "config": cfg.to_dict()}, "converted_from": Path(path).name}
