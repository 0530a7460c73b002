"""DeMansia 2 (task `demansia2`): `model.py` the network and its timm names, `module.py` the LightningModule,
`verbs.py` the `classify` verb, `convert.py` the converter of the released checkpoint."""
from models.demansia2.model import DeMansia2Net, mix_box, net_kwargs, swap_box
from models.demansia2.module import DeMansia2

__all__ = ["DeMansia2", "DeMansia2Net", "mix_box", "net_kwargs", "swap_box"]
