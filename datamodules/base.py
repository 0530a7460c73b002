"""`ZooDataModule`: reading a real dataset from `--data-dir`, or built-in demo data, into resumable loaders."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.samplers import (
    EpochShuffleSampler,
    RankShardSampler,
    SeededItems,
    SeededSampler,
    data_parallel_rank,
)
from zoo.errors import ZooError

REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_root() -> Path:
    """Where demo datasets are generated: $ZOO_DEMO_DIR, else <repo>/.zoo_cache/demo (git-ignored)."""
    return Path(os.environ.get("ZOO_DEMO_DIR") or REPO_ROOT / ".zoo_cache" / "demo")


class ZooDataModule(L.LightningDataModule):
    """Base DataModule of the zoo.

    A task implements `make_demo(root)` (write a small, learnable dataset in the real format under `root`) and
    `setup(stage)` (read `self.root`). Without `data_dir` the demo set is generated once under `demo_root()` and read
    by the same code as the real dataset. Loaders are torchdata `StatefulDataLoader`s, whose position Lightning stores in
    checkpoints, so a run resumed mid-epoch sees exactly the batches it would have seen.

    Args:
        cfg: the task's config (batch_size, num_workers, seed, image_size, ...).
        data_dir: the dataset root as its owners publish it; None = demo data.
    """

    DEMO_NAME: ClassVar[str] = ""
    LAYOUT_HELP: ClassVar[str] = ""  # what the data dir must look like, for error messages

    def __init__(self, cfg: Any, data_dir: str | os.PathLike | None = None):
        super().__init__()
        self.cfg = cfg
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise ZooError(
                f"--data-dir {self.data_dir} does not exist or is not a directory. Expected: {self.LAYOUT_HELP} "
                f"Omit --data-dir to train on the built-in demo data."
            )

    # ----- data location -----
    @property
    def is_demo(self) -> bool:
        return self.data_dir is None

    @property
    def root(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        path = demo_root() / self.DEMO_NAME
        if not (path / ".complete").exists():
            self._generate_demo(path)
        return path

    def _generate_demo(self, path: Path) -> None:
        """Write the demo set to a temporary sibling, then rename: concurrent runs never see half a dataset."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            self.make_demo(tmp)
            (tmp / ".complete").touch()
            try:
                tmp.rename(path)
            except OSError:  # another process finished first
                if not (path / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def make_demo(self, root: Path) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:
        _ = self.root  # generate the demo set once, on rank 0

    # ----- what the reader found -----
    def describe(self) -> dict[str, Any]:
        """What the reader found, after `setup("fit")`: `{"train": n, "val": n, "test": n}` images (0 for a split the
        task does not have), plus the task's own breakdowns where a subclass adds them (`train.py --describe-data`)."""
        out: dict[str, Any] = {}
        for split in ("train", "val", "test"):
            try:
                loaders = getattr(self, f"{split}_dataloader")()
            except Exception:  # noqa: BLE001 - Lightning's default hook raises for a split the task does not have
                out[split] = 0
                continue
            first = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            out[split] = len(first.dataset)
        return out

    # ----- what the model needs to know about the data -----
    def config_overrides(self) -> dict[str, Any]:
        """Config fields the data decides (e.g. num_classes, class_names); called after `setup('fit')`."""
        return {}

    # ----- loaders -----
    def loader(self, dataset, *, train: bool, batch_size: int | None = None, **kwargs: Any) -> StatefulDataLoader:
        """A resumable loader with the config's batch size and workers.

        Training loaders shuffle with `EpochShuffleSampler` (order = f(seed, epoch)) unless a `sampler` or
        `batch_sampler` is given; samplers of your own should also derive their order from (seed, epoch) via
        `set_epoch`, or a resumed run will not see the same batches. The training sampler is wrapped in
        `SeededSampler` and the dataset in `SeededItems`, so random augmentations in `__getitem__` (Python's
        `random`, NumPy's and torch's global RNGs) are reproducible per item across resumes and worker counts.
        Under DDP each sampler shards by rank itself (Lightning's sampler injection is off): training samplers
        take every world-th item or batch, evaluation loaders read one contiguous block per rank (`RankShardSampler`).
        """
        workers = int(self.cfg.num_workers)
        args: dict[str, Any] = dict(
            batch_size=batch_size or self.cfg.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),  # worker seeds
        )
        if "batch_sampler" in kwargs:
            for k in ("batch_size", "drop_last"):
                args.pop(k)
        elif train and "sampler" not in kwargs:
            args["sampler"] = EpochShuffleSampler(dataset, int(self.cfg.seed))
        elif not train and "sampler" not in kwargs and data_parallel_rank()[0] > 1:
            # Lightning's injected DistributedSampler is off (zoo.trainer): it would pad with repeated items and
            # interleave them, and cannot shard a batch sampler of ours.
            args["sampler"] = RankShardSampler(len(dataset))
        args.update(kwargs)
        if train and args.get("drop_last") and args.get("batch_size") and len(dataset) < args["batch_size"]:
            raise ZooError(f"The training set has {len(dataset)} item(s), fewer than one batch of {args['batch_size']}"
                           f": no training step could run. Use --batch-size {max(1, len(dataset))} or less, or more "
                           f"data.")
        if train:
            # Each item's augmentation is drawn from a seed = f(seed, epoch, position), not from the worker's RNG:
            # resumed runs (fresh workers) and any worker count see the same augmentations.
            key = "batch_sampler" if args.get("batch_sampler") is not None else "sampler"
            args[key] = SeededSampler(args[key], int(self.cfg.seed) + 7919 * data_parallel_rank()[1])  # ranks differ
            dataset = SeededItems(dataset)
        return StatefulDataLoader(dataset, **args)
