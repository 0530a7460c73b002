"""Age and gender (task `agegender`): `model.py` the heads on a timm backbone, `module.py` the LightningModule,
`metrics.py` MAE per decade and gender scores, `verbs.py` predict / export (ONNX + int8)."""
from models.agegender.module import AgeGender

__all__ = ["AgeGender"]
