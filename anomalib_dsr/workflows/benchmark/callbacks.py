"""Lightning callbacks of a benchmark job: test throughput in images/s, and progress lines on the terminal
(anomalib hides each job's output)."""

from __future__ import annotations

import math
import sys
import time

from lightning.pytorch import Callback


class ThroughputTimer(Callback):
    """Test images per second of the model's step (pre-processing, forward, post-processing; not metrics)."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch.image)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else math.nan


class JobProgress(Callback):
    """One line per tenth of a job's training steps (model, dataset, step / total, elapsed) on the terminal's
    stderr, which anomalib's ``hide_output`` leaves alone."""

    def __init__(self, label: str, lines: int = 10) -> None:
        self.label = label
        self.lines = lines
        self._start = 0.0
        self._every = 1

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._every = max(1, math.ceil(trainer.estimated_stepping_batches / self.lines))
        self._print(f"training, {int(trainer.estimated_stepping_batches)} steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if step % self._every == 0 or step == total:
            self._print(f"step {step}/{total}, {time.perf_counter() - self._start:.0f} s")

    def on_test_start(self, trainer, pl_module) -> None:
        self._print("testing")

    def _print(self, message: str) -> None:
        print(f"[benchmark] {self.label}: {message}", file=sys.__stderr__, flush=True)
