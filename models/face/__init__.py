"""Face embeddings (task `face`): `model.py` the encoder and its timm names, `module.py` the LightningModule,
`metrics.py` retrieval metrics and LFW pairs verification (the pair maths is `zoo/verification.py`), `verbs.py`
compare / evaluate / visualize."""
from models.face.model import FaceEmbeddingNet, MambaFaceEncoder, upstream_state_dict_to_zoo
from models.face.module import FaceEmbedder

__all__ = ["FaceEmbedder", "FaceEmbeddingNet", "MambaFaceEncoder", "upstream_state_dict_to_zoo"]
