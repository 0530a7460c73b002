"""One LightningDataModule per dataset format; each falls back to built-in demo data written in that same format."""
import os

# albumentations asks the package registry for a newer version on import; never wait on the network for that.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
