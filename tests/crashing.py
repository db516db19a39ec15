"""A stand-in for a killed process, shared by the resume tests."""

from __future__ import annotations

from kdistill.callbacks import Callback


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Raises after global step ``n``, or at the end of epoch ``epoch``."""

    def __init__(self, n: int | None = None, *, epoch: int | None = None):
        self.n, self.epoch = n, epoch

    def on_train_batch_end(self, step, logs=None):
        if self.trainer.global_step == self.n:
            raise Crash

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Crash
