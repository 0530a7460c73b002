"""VMamba v0 (MzeroMiko/VMamba, the classifier of the `#20240218` / `#v0cls` releases), shared by the tasks:
`model.py` the network and its timm names `vmamba_{micro,tiny,small}_v0`, `convert.py` the release files' layout
(`load_vmamba_v0`, the release table `RELEASES`)."""
from models.vmamba.convert import RELEASES, load_vmamba_v0
from models.vmamba.model import VMAMBA_V0_SIZES, PatchEmbed, PatchMerging, Stage, VMambaV0

__all__ = ["PatchEmbed", "PatchMerging", "RELEASES", "Stage", "VMAMBA_V0_SIZES", "VMambaV0", "load_vmamba_v0"]
