"""Palm synthesis (task `palm`): `model.py` the denoiser (the library's Unet, VSS blocks at low resolutions; not
registered with timm: it takes (x, t), not an image), `module.py` the LightningModule (diffusion, EMA, sampling),
`sampling.py` DDIM with given noise, `variations.py` identity-keeping variations, `metrics.py` identity and
image-quality metrics, `verbs.py` generate / evaluate / quality."""
from models.palm.module import PalmDiffusion

__all__ = ["PalmDiffusion"]
