"""How the palm-synthesis literature judges a generator: identity consistency of a generated set (verification AUC /
EER of same- vs different-individual pairs in a recogniser's embedding space), open-set rank-1 identification, and
FID / KID (torchmetrics) against real images when Inception weights are available locally."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from zoo.errors import ZooError
from zoo.verification import all_pair_scores, cosine_gallery_ranks, rank_k, verification_summary


def identity_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Verification over every unordered pair of a set: {"auc", "eer", "tar_at_far_1e-3", "same_pairs",
    "different_pairs", "mean_same", "mean_different"} (cosine similarities). embeddings (N, D), labels (N,) ints."""
    scores, same = all_pair_scores(embeddings, labels)
    return {**verification_summary(scores, same), "same_pairs": int(same.sum()), "different_pairs": int((~same).sum()),
            "mean_same": float(scores[same].mean()) if same.any() else float("nan"),
            "mean_different": float(scores[~same].mean()) if (~same).any() else float("nan")}


def rank1_identification(embeddings: Tensor, labels: Tensor) -> float:
    """Open-set protocol of the palm papers: the first image of each identity is its gallery entry, every other image
    a probe; rank-1 = the fraction of probes whose own identity's gallery entry is more similar than every other
    identity's (a tie counts against the probe, `zoo.verification.gallery_ranks`)."""
    lab = labels.detach().cpu()
    gallery, probes = [], []
    seen: set[int] = set()
    for i, y in enumerate(lab.tolist()):
        (probes if y in seen else gallery).append(i)
        seen.add(y)
    if not probes or len(gallery) < 2:
        return float("nan")
    return rank_k(cosine_gallery_ranks(embeddings, lab, gallery, probes), 1)


# ----- FID / KID -----
WEIGHTS_HINT = ("Give inception_v3_google-*.pth (torchvision) or, with torch-fidelity installed, "
                "pt_inception-2015-12-05-*.pth.")


class TorchvisionInception(torch.nn.Module):
    """torchvision's Inception v3 up to the 2048-d average pool, from a local weights file (weights_only load):
    uint8 (B, 3, H, W) -> (B, 2048) float. Resized to 299 and ImageNet-normalised inside."""

    num_features = 2048

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        from zoo.checkpoint import safe_load

        try:  # the zoo's one safe reader: tensors and plain data only, nothing in the file runs
            with warnings.catch_warnings():  # torch's note on a raw pickle's protocol: the error below says it
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = safe_load(weights, what="Inception weight file")
        except ZooError:
            raise
        except Exception as e:  # noqa: BLE001 - a raw pickle, a truncated or foreign file: said in one line
            import pickle

            detail = ("a pickle torch.save did not write, or one a weights-only load refuses"
                      if isinstance(e, pickle.UnpicklingError) else (str(e).splitlines() or [""])[0][:120])
            raise ZooError(f"--inception {weights}: not a checkpoint that can be read safely ({type(e).__name__}: "
                           f"{detail}). {WEIGHTS_HINT}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ZooError(f"--inception {weights}: holds no state dict of tensors. {WEIGHTS_HINT}")
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as e:  # same names, other shapes
            raise ZooError(f"--inception {weights}: not torchvision Inception v3 weights ({str(e)[:160]}). "
                           f"{WEIGHTS_HINT}") from None
        if missing:
            raise ZooError(f"--inception {weights}: not torchvision Inception v3 weights ({len(missing)} missing keys, "
                           f"e.g. {missing[0]}). {WEIGHTS_HINT}")
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def inception_feature(weights: str | Path | None):
    """The `feature` argument for torchmetrics' FID / KID from a local weights file, or a ZooError saying what to
    provide. Nothing is ever downloaded."""
    how = ("FID/KID need Inception weights on disk: pass --inception PATH with torchvision's "
           "inception_v3_google-0cc3c7bd.pth (or, with torch-fidelity installed, pt_inception-2015-12-05-6726825d.pth); "
           "nothing is downloaded.")
    if not weights:
        raise ZooError(how)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ZooError(f"--inception {path}: no such file. {how}")
    if path.name.startswith("pt_inception"):
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ZooError(f"--inception {path}: the TF-ported FID weights need torch-fidelity, which is not "
                           f"installed. Install it, or give torchvision's inception_v3_google-*.pth.") from None
        return 2048, str(path)
    return TorchvisionInception(path), None


def fid_kid(real: Tensor, fake: Tensor, weights: str | Path | None, subset_size: int = 50) -> dict[str, float]:
    """FID and KID (mean, std) of uint8 image sets (N, 3, H, W) with torchmetrics. KID subsets are capped at the
    smaller set's size. Note: with torchvision's Inception the numbers are not comparable to papers' (TF) FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    feature, path = inception_feature(weights)
    extra = {"feature_extractor_weights_path": path} if path else {}
    fid = FrechetInceptionDistance(feature=feature, **extra)
    kid = KernelInceptionDistance(feature=feature, subset_size=max(2, min(subset_size, len(real), len(fake))), **extra)
    for batch, is_real in ((real, True), (fake, False)):
        for i in range(0, len(batch), 32):
            fid.update(batch[i:i + 32], real=is_real)
            kid.update(batch[i:i + 32], real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "real": len(real), "generated": len(fake)}
