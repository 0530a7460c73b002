"""`ZooModule`: what every task's LightningModule shares (config, hyper-parameters, optimizer and schedule)."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning as L

from zoo.config import BaseConfig
from zoo.config_renames import upgrade, upgrade_state
from zoo.errors import ZooError
from zoo.optim import build_optimizer, build_scheduler


class ZooModule(L.LightningModule):
    """Base LightningModule of the zoo.

    A task sets `TASK` (its registry name) and `CONFIG` (its `zoo.config.BaseConfig` dataclass) and builds its network in
    `__init__` from `self.cfg`. The whole config is saved as hyper-parameters, so
    `Task.load_from_checkpoint(path)` rebuilds the model with no other argument, on any device. Loading a checkpoint
    of another task raises a `ZooError` that names both.

    Args:
        config: a config instance, a dict of its fields (as stored in checkpoints) or None for the default preset.
        task: the task name stored in checkpoints; checked against `TASK`.
        **overrides: config fields to change, e.g. `DeMansia2(num_classes=100)`.
    """

    TASK: ClassVar[str] = ""
    CONFIG: ClassVar[type[BaseConfig]] = BaseConfig

    def __init__(self, config: BaseConfig | dict[str, Any] | None = None, task: str | None = None, **overrides: Any):
        super().__init__()
        if task is not None and task != self.TASK:
            raise ZooError(
                f"This checkpoint holds a '{task}' model, not a '{self.TASK}' model ({type(self).__name__}). "
                f"Open it with the '{task}' task's class, or let `python predict.py` pick the class from the checkpoint."
            )
        if isinstance(config, BaseConfig):
            cfg = config
        elif config is None:
            cfg = self.CONFIG.from_presets(None)
        else:
            cfg = self.CONFIG.from_dict(config, strict=False, where=f"{self.TASK} checkpoint config")
        if overrides:  # old field names among them are mapped first, so they replace the config's value
            cfg = self.CONFIG.from_dict({**cfg.to_dict(), **upgrade(self.CONFIG, overrides, type(self).__name__)})
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict(), "task": self.TASK})

    # ----- checkpoints -----
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights saved under an attribute's old name (`zoo.config_renames.STATE_RENAMES`: the network is `net`, the
        loss `criterion` in every task) load under the new one. A task that overrides this calls it first."""
        for key in ("state_dict", "current_model_state"):  # the latter: the raw weights beside an EMA (callbacks.ema)
            if isinstance(checkpoint.get(key), dict):
                upgrade_state(self.TASK, checkpoint[key])

    # ----- optimisation -----
    def configure_optimizers(self):
        optimizer = build_optimizer(self, self.cfg)
        scheduler = build_scheduler(optimizer, self.cfg, self._updates_per_epoch(), self.schedule_epochs())
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.cfg.sched_interval}}

    def max_epochs(self) -> int:
        """The run's epochs: the Trainer's max_epochs, else the config's."""
        return self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else self.cfg.epochs

    def schedule_epochs(self) -> int:
        """Epochs the warm-up + decay schedule spans (a task with stages overrides this)."""
        return self.max_epochs()

    def _updates_per_epoch(self) -> int:
        """Optimizer steps per epoch, computed from the datamodule's loader length.

        `trainer.estimated_stepping_batches` is avoided on purpose: it builds the train loader before Lightning restores
        the loop state, and the saved loader position is then never applied on `--resume`.
        """
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        try:
            n = len(dm.train_dataloader()) if dm is not None else 0
        except (TypeError, NotImplementedError):
            n = 0
        if n == 0:
            return 1
        n = math.ceil(n / max(1, trainer.world_size))
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            n = min(n, limit)
        elif limit is not None and limit < 1.0:
            n = max(1, int(n * limit))
        return max(1, math.ceil(n / max(1, trainer.accumulate_grad_batches)))

    def lr_scheduler_step(self, scheduler, metric=None):
        # timm schedulers take the epoch / update count explicitly rather than counting calls.
        if self.cfg.sched_interval == "epoch":
            scheduler.step(epoch=self.current_epoch + 1)
        else:
            scheduler.step_update(num_updates=self.global_step)

    # ----- released weights -----
    def prepare_data(self) -> None:
        """Lightning calls this once per node (local rank 0) before every rank's `setup`: a new run (never a resume)
        fetches and converts the released weights it starts from into the cache here, so the ranks of a multi-device
        run read the cache instead of downloading the file each."""
        if self.starts_fresh:
            self.fetch_released()

    @property
    def starts_fresh(self) -> bool:
        """Whether this fit starts new weights (no trainer yet, or a fit that is not a `--resume`): only then does a
        run load released or `init_from` weights."""
        return not getattr(self._trainer, "ckpt_path", None)

    def fetch_released(self) -> None:
        """Fill `zoo.pretrained`'s cache with the released weights `setup` will load; nothing by default (tasks with
        a `pretrained` field override it)."""

    # ----- size -----
    def parameter_count(self) -> int:
        """Parameters of the network (each Parameter once); a task holding a weight copy (an EMA submodule)
        overrides this to leave the copy out."""
        return sum(p.numel() for p in self.parameters())

    # ----- inference -----
    def predict_commands(self) -> list:
        """The task's own `predict.py` verbs (`zoo.commands.Command`); none by default. Every task declares them one
        way: `COMMANDS: list[Command]` at the end of its verbs.py, returned here (imported when asked for)."""
        return []

    def commands(self) -> list:
        """Every `predict.py` verb: the task's own, then the generic ones it does not define itself (`export`, with
        `--format safetensors` for every task)."""
        from zoo.export import safetensors_command

        own = self.predict_commands()
        taken = {name for c in own for name in (c.name, *c.aliases)}
        return own + [c for c in (safetensors_command(),) if c.name not in taken]

    # ----- helpers for tasks -----
    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.cfg, "class_names", ()) or [])
