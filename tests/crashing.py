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


class CrashInStage(CrashAt):
    """:class:`CrashAt` for a YAML run: only in the stage named ``only`` (the config passes
    ``stage: "{stage}"``), and only while the file ``flag`` exists (removed on crashing, so
    the same config then resumes to the end)."""

    def __init__(self, n: int | None = None, *, epoch: int | None = None, stage: str = "", only: str = "",
                 flag: str = ""):
        super().__init__(n, epoch=epoch)
        self.active, self.flag = stage == only, flag

    def _crash_now(self) -> bool:
        import os

        if self.active and self.flag and os.path.exists(self.flag):
            os.remove(self.flag)
            return True
        return False

    def on_train_batch_end(self, step, logs=None):
        if self.trainer.global_step == self.n and self._crash_now():
            raise Crash

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch and self._crash_now():
            raise Crash
