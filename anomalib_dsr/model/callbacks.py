"""Lightning machinery that is not the model: callbacks :class:`~anomalib_dsr.Dsr` returns from
``configure_callbacks()`` and the general VQ-VAE's pretraining reuses."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

logger = logging.getLogger(__name__)


class FiniteLossGuard(pl.Callback):
    """Stop on a non-finite loss, naming its step (and the module's ``phase``, if it has one), before any weight
    turns non-finite.

    On CPU the check is immediate: it costs nothing there. On an accelerator it would make every step wait for the
    device, so there (``sync_free``, with a fused optimiser) the optimiser skips the update on the device when the
    loss is not finite, and the loss is read at the next step or at the end of training.

    Args:
        sync_free: defer the check by one step; ``None``: on any device but the CPU.
    """

    def __init__(self, sync_free: bool | None = None) -> None:
        self.sync_free = sync_free
        self._unchecked: tuple[torch.Tensor, int, int | None] | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        deferred = self.sync_free if self.sync_free is not None else loss.device.type != "cpu"
        optimizers = trainer.optimizers
        fused = bool(optimizers) and all(group.get("fused") for group in optimizers[0].param_groups)
        if deferred and fused:
            self.raise_if_not_finite()  # the previous step's
        self._unchecked = (loss.detach(), pl_module.global_step, getattr(pl_module, "phase", None))
        if not (deferred and fused):
            self.raise_if_not_finite()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """With deferred checks, tell the fused optimiser to skip this update on the device if the loss is not
        finite."""
        if self._unchecked is not None:
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            optimizer.found_inf = (~torch.isfinite(self._unchecked[0])).float()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raise_if_not_finite()

    def raise_if_not_finite(self) -> None:
        """Raise ``FloatingPointError`` if the last loss seen is not finite."""
        if self._unchecked is None:
            return
        loss, step, phase = self._unchecked
        self._unchecked = None
        if not torch.isfinite(loss):
            where = f"step {step}" if phase is None else f"step {step} (phase {phase})"
            msg = f"DSR loss became {loss.item()} at {where}; stopping before weights turn NaN."
            raise FloatingPointError(msg)


class RngStateCheckpoint(pl.Callback):
    """Keep torch's global random state in checkpoints (under ``key``) and restore it when fitting resumes, so that
    a run resumed from an end-of-epoch checkpoint continues exactly as an uninterrupted one: simulated anomalies,
    the data order and dead-code restarts draw from it. Tensors only, so ``weights_only`` loading reads it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        checkpoint[self.key] = {"torch": torch.get_rng_state(), "torch.cuda": cuda}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        rng = checkpoint.get(self.key)
        if rng is None or trainer.state.fn != TrainerFn.FITTING:
            return
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and len(rng["torch.cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["torch.cuda"])


class FrozenModulesSetup(pl.Callback):
    """What fitting a module whose phases train some sub-modules and freeze others needs from Lightning.

    - DDP is told to find unused parameters: the other phase's modules get no gradient (they keep ``grad=None``, so
      Adam leaves them and their state alone, as in a single process).
    - Lightning's "Found N module(s) in eval mode at the start of training" is silenced when those N modules are
      exactly the ones under ``frozen_prefix``, frozen in eval mode on purpose; any other module left in eval mode
      changes N and still warns.
    """

    def __init__(self, frozen_prefix: str) -> None:
        self.frozen_prefix = frozen_prefix
        self._filter: tuple | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if stage == "fit" and isinstance(strategy, DDPStrategy):
            kwargs = strategy._ddp_kwargs  # noqa: SLF001  (Lightning offers no public setter after construction)
            if not kwargs.get("find_unused_parameters"):
                kwargs["find_unused_parameters"] = True
                logger.info("DSR trains one phase's modules at a time: DDP set to find_unused_parameters=True.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning warns between on_fit_start and on_train_start.
        frozen = [name for name, module in pl_module.named_modules() if not module.training]
        if frozen and all(name.startswith(self.frozen_prefix) for name in frozen):
            message = rf"Found {len(frozen)} module\(s\) in eval mode at the start of training"
            warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)
            self._filter = warnings.filters[0]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._filter in warnings.filters:
            warnings.filters.remove(self._filter)
        self._filter = None
