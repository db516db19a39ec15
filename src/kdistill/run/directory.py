"""The run directory: deciding what to do with one, locking it, its bookkeeping files.

Layout and guarantees are described in :mod:`kdistill.experiment`. Every file is written
atomically; one process at a time holds ``RUN_DIR/.lock``; a stage's ``checkpoint.pt`` is
trusted only while it matches the SHA-256 its ``done.json`` recorded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..atomic import atomic_write_text
from ..checkpoint import CheckpointError, file_sha256
from ..config import ExperimentConfig, load_config
from ..errors import RunDirectoryError
from .fingerprints import config_fingerprint
from .locks import LockHeld, describe_holder, exclusive_lock


def read_json(path: Path) -> Any:
    """A bookkeeping file of a run directory (run.json, done.json, stage.json, metrics.json).

    Raises:
        RunDirectoryError: the file is unreadable or not valid JSON (naming it).
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirectoryError(
            f"{path} is damaged and cannot be read ({type(e).__name__}: {str(e)[:200]}): it was cut short or "
            "edited. kdistill writes it atomically, so a kill does not do this; restore it, or delete it "
            "(that stage, or the whole run with --force, is then trained again)") from e


def verify_stage_checkpoint(ckpt: Path, done: dict, done_path: Path | None = None, *,
                            fix: str = "Train the stage again or restore an intact copy.") -> None:
    """Check a stage's ``checkpoint.pt`` against the SHA-256 its ``done.json`` recorded.

    A ``done.json`` written before kdistill recorded the hash has none: nothing to check
    (the checkpoint's own content digest, if any, is still checked when it is read).

    Raises:
        CheckpointError: the file is missing or its bytes differ from those written.
    """
    expected = done.get("checkpoint_sha256")
    if expected is None:
        return
    if not ckpt.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt}: the file does not exist, though "
                              f"{done_path or 'its done.json'} marks the stage finished")
    found = file_sha256(ckpt)
    if found != expected:
        size, written = ckpt.stat().st_size, done.get("checkpoint_bytes")
        sizes = f"{size} bytes" + (f", {written} when written" if written is not None and written != size else "")
        raise CheckpointError(
            f"checkpoint {ckpt} ({sizes}) is truncated or corrupt: it does not match the SHA-256 recorded in "
            f"{done_path or 'done.json'} when it was written: expected {expected}, found {found}. Its bytes changed "
            f"on disk since (a failing disk, a damaged copy, an edit), so its weights cannot be trusted. {fix}"
        )


def prepare_run_dir(config: ExperimentConfig, run_dir: Path, *, force: bool, log: Callable[[str], None]) -> str:
    """Decide what to do with ``run_dir``; returns ``"new"``, ``"continue"`` or ``"finished"``.

    Raises:
        RunDirectoryError: the directory holds another run (without ``force``), or is a
            non-empty folder that is not a run directory.
    """
    cfp = config_fingerprint(config)
    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            info = read_json(run_json)
        except RunDirectoryError as e:
            if not force:
                raise RunDirectoryError(f"{e}. Or replace the whole run directory with --force.") from None
            info = {}
        same = info.get("config_fingerprint") == cfp
        if info.get("status") == "failed before training" and not same and not force:
            force = True  # nothing of it trained: the corrected config simply starts here
            log(f"{run_dir} holds a run that stopped before training (its config was refused); starting over")
        if force:
            log(f"--force: discarding the earlier run in {run_dir}")
            for item in ("stages", "figures"):
                shutil.rmtree(run_dir / item, ignore_errors=True)
            for item in ("metrics.json", "report.md", "report.html", "run.json", "config.yaml", "export.json",
                         *(p.name for p in run_dir.glob("student*.*"))):
                (run_dir / item).unlink(missing_ok=True)
            return "new"
        if same and info.get("status") == "finished":
            damaged = damaged_stages(run_dir)
            if not damaged:
                return "finished"
            log(f"{run_dir} holds this finished run, but the checkpoint of stage(s) {', '.join(damaged)} changed "
                "on disk after it was written (its SHA-256 differs from the one in done.json): continuing the run "
                "to train them again")
            return "continue"
        if same:
            log(f"{run_dir} holds an unfinished run of this config: continuing it")
            return "continue"
        state = "a finished" if info.get("status") == "finished" else "an unfinished"
        raise RunDirectoryError(
            f"{run_dir} already holds {state} run of a different config; nothing was overwritten. "
            f"Use another output directory (--out or output_dir), continue that run with "
            f"`kdistill run --resume {run_dir}`, or replace it with --force."
        )
    refuse_foreign_folder(run_dir)
    return "new"


def damaged_stages(run_dir: Path) -> list[str]:
    """The finished stages whose ``checkpoint.pt`` no longer matches the SHA-256 in their
    ``done.json`` (or is gone)."""
    damaged = []
    for done_path in sorted((run_dir / "stages").glob("*/done.json")):
        try:
            verify_stage_checkpoint(done_path.parent / "checkpoint.pt", json.loads(done_path.read_text()), done_path)
        except (CheckpointError, ValueError, OSError):
            damaged.append(done_path.parent.name)
    return damaged


#: The run directory's lock file (see :func:`lock_run_dir`).
LOCK_FILE = ".lock"


def refuse_foreign_folder(run_dir: Path) -> None:
    """Raise if ``run_dir`` is a non-empty folder that is not a run directory (its lock
    file alone does not count)."""
    if (run_dir / "run.json").is_file() or not run_dir.is_dir():
        return
    if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunDirectoryError(
            f"{run_dir} is not empty and is not a kdistill run directory (no run.json); "
            "choose an empty or new output directory"
        )


def lock_run_dir(stack: contextlib.ExitStack, run_dir: Path, log: Callable[[str], None]) -> None:
    """Take the exclusive lock ``RUN_DIR/.lock`` for the rest of ``stack``.

    Raises:
        RunDirectoryError: another live process holds it (the message names it), or
            ``run_dir`` is a folder that is not a run directory (nothing is created in it).
    """
    refuse_foreign_folder(run_dir)  # before the lock file is written into someone's folder

    def stale(holder: dict) -> None:
        log(f"{run_dir}: taking over the lock left by {describe_holder(holder)}, which ended without "
            "releasing it (killed or crashed)")

    try:
        stack.enter_context(exclusive_lock(run_dir / LOCK_FILE, on_stale=stale))
    except LockHeld as e:
        raise RunDirectoryError(
            f"{run_dir} is in use by another kdistill run: {describe_holder(e.holder)} holds its lock "
            f"{e.path}. Two runs writing one directory would mix their checkpoints and results, so this one "
            "stopped without writing anything. Wait for that run to end (or stop it), then run again, "
            "or give this run another output directory (--out or output_dir)."
        ) from None


#: Name patterns of the temporary files of atomic writes (``.NAME.XXXX.tmp``) and of stage
#: copies (``.NAME.XXXX.copy``), left behind when a process is killed mid-write.
_TEMP_PATTERNS = (".*.tmp", ".*.copy")


def remove_stale_temp_files(run_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Delete the leftover temporary files of interrupted writes in a run directory (its
    top level, ``stages/`` and ``figures/``; teacher caches keep their own resumable
    temporaries). Call it only with the run directory's lock held: then no other writer of
    these files is alive, so every one of them is stale. Returns the removed paths."""
    places = [run_dir, run_dir / "figures", *sorted(p for p in (run_dir / "stages").glob("*") if p.is_dir())]
    removed, size = [], 0
    for place in places:
        for pattern in _TEMP_PATTERNS:
            for f in sorted(place.glob(pattern)):
                if not f.is_file() or f.is_symlink():
                    continue
                try:
                    n = f.stat().st_size
                    f.unlink()
                except FileNotFoundError:
                    continue
                removed.append(f)
                size += n
    if removed:
        shown = ", ".join(str(f.relative_to(run_dir)) for f in removed[:3]) + (", ..." if len(removed) > 3 else "")
        log(f"removed {len(removed)} leftover temporary file(s) ({size / 2**20:.1f} MiB) of writes interrupted "
            f"earlier: {shown}")
    return removed


def tee(log: Callable[[str], None], path: Path) -> Callable[[str], None]:
    """``log`` that also appends each message, time-stamped, to ``path`` (the run's log)."""

    def both(message: str) -> None:
        log(message)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return both


def write_run_json(run_dir: Path, config: ExperimentConfig, status: str, started: float) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps({
        "status": status, "config_fingerprint": config_fingerprint(config), "name": config.name,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kdistill_version": __version__,
    }, indent=1))


def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config a run directory was made with.

    Raises:
        RunDirectoryError: the folder is not a kdistill run directory.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirectoryError(
            f"{run_dir} is not a kdistill run directory (no config.yaml); give the folder "
            "`kdistill run` wrote (its output_dir or --out)")
    return load_config(run_dir / "config.yaml")
