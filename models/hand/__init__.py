"""Hand biometrics (task `hand`): `model.py` the VMamba v0 encoder, U-Net decoder, heads and timm names, `module.py`
the LightningModule, `metrics.py` classification and open-set retrieval metrics and the protocol tables, `verbs.py`
identify / enroll / evaluate."""
from models.hand.model import HandNet, VMambaV0, load_vmamba_v0
from models.hand.module import HandBiometrics

__all__ = ["HandBiometrics", "HandNet", "VMambaV0", "load_vmamba_v0"]
