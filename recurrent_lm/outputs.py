"""Where commands write: one rule for every output path, in one place.

Every `rlm` command that writes (export, sweep, compare, demo, lm-eval, label-steps, tasks export, select-traces,
tokenizer train / tasks, retrofit, convert-huginn, and the exported model of train / finetune) claims its target
with `claimed_output` before any work:

- the target's shape is checked: a file where a folder belongs, or the reverse, is a one-line error naming the
  option;
- an existing non-empty target is refused unless `overwrite`, which then replaces it whole (no file of the old
  content survives);
- the target is never one of the command's inputs, nor a folder that holds one (replacing it would destroy it);
- a target that a live run holds is refused (a lock file beside it names the holder's pid; a lock left by a
  killed run is taken over);
- everything is written into a staging path beside the target, which replaces the target only when the command
  finished: a failure leaves the target as it was and no temporary file behind, and nothing prints "wrote" before
  the target holds it.

A command interrupted (Ctrl-C) may keep what it finished: it writes that into the staging path, marked incomplete,
and calls `Output.keep()`; the interrupt then goes on as `Interrupted`, which the CLI reports in one line (exit 130).
"""

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from .recipes import resolve_model_dir

STAGING_SUFFIX = ".partial"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a one-line account of what was kept (the CLI prints it and exits with 130)."""


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight of a training run is not finite (NaN or inf): the run stopped
    (recurrent_lm.train.divergence); defined here, with Interrupted, so that `rlm` reports it without importing
    Lightning."""


class Output:
    """A claimed output: write into `path` (the staging path); `target` is where it lands, `replaces` whether an
    earlier result is there (which only a finished run replaces)."""

    def __init__(self, path: Path, target: Path, replaces: bool):
        self.path, self.target, self.replaces, self.kept = path, target, replaces, False

    @property
    def landing(self) -> Path:
        """Where what was written lands: the target, or, for a kept partial result that would replace an earlier
        finished one, a folder beside it (an interrupted run never destroys a finished result)."""
        if self.kept and self.replaces:
            return self.target.with_name(f"{self.target.name}.interrupted-{os.getpid()}")
        return self.target

    def keep(self) -> None:
        """Move what was written to `landing` even though the command is ending with an exception (an
        interrupted run's finished part, marked incomplete by the command)."""
        self.kept = True


def check_output_path(path: str | Path, kind: Literal["dir", "file"], option: str) -> None:
    """A file where a folder belongs (or the reverse), at the target or at any folder above it, is an error; so is
    a target that is a symbolic link, the current folder or a folder above it (replacing it would pull the floor
    from under the command)."""
    if not str(path).strip():
        raise ValueError(f"{option} is empty; give a path to write")
    if kind == "file" and str(path).endswith(("/", os.sep)):
        raise IsADirectoryError(f"{option} {path} names a folder (it ends in /); give a file path to write")
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise ValueError(f"{option} {path} is not a regular file or folder (a device, pipe or socket); give a path "
                         "to write")
    if path.is_symlink():
        raise ValueError(f"{option} {path} is a symbolic link; give the real path to write")
    if path.resolve() == Path.cwd().resolve() or path.resolve() in Path.cwd().resolve().parents:
        raise ValueError(f"{option} {path} is the current folder or holds it; give an output a folder of its own")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"{option} {path}: {parent} is a file, not a folder")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file; give a folder to write into")
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give a file path to write (e.g. {path / 'out.jsonl'})")


def check_not_an_input(path: Path, inputs: Iterable[str | Path | None], option: str) -> None:
    """The output may not be an input, a folder that holds one, or a file or folder that exists inside an input
    folder (a model directory's weights, say; a new path there harms nothing). A shipped checkpoint's name counts as
    its folder."""
    target = path.resolve()
    for given in inputs:
        if given is None:
            continue
        source = resolve_model_dir(given).resolve()
        inside = source.is_dir() and source in target.parents and target.exists()
        if source == target or target in source.parents or inside:
            what = "is" if source == target else "holds" if target in source.parents else "lies inside"
            raise ValueError(f"{option} {path} {what} one of this command's inputs ({given}); write somewhere else")


def is_nonempty(path: Path) -> bool:
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


@contextlib.contextmanager
def claimed_output(path: str | Path, *, option: str, kind: Literal["dir", "file"] = "dir", overwrite: bool = False,
                   inputs: Iterable[str | Path | None] = (), command: str = "rlm") -> Iterator[Output]:
    """Claim `path` for this run (the checks above, then its lock) and yield an Output whose staging path the
    command writes into; on success it replaces `path` whole. `option` names the path in errors (e.g. "--out")."""
    check_output_path(path, kind, option)
    path = Path(os.path.normpath(path))  # "out/../x" is x: its lock and staging path sit beside x
    check_not_an_input(path, inputs, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(path.with_name(f".{path.name}.lock"), f"{option} {path}", command):
        if is_nonempty(path) and not overwrite:
            raise FileExistsError(f"{option} {path} already exists and is not empty; pass --overwrite to replace "
                                  "it, or write somewhere else")
        remove_stale_staging(path)
        path = path.absolute()  # a later chdir moves nothing
        staging = path.with_name(f".{path.name}.{os.getpid()}{STAGING_SUFFIX}")
        if kind == "dir":
            staging.mkdir()
        output = Output(staging, path, replaces=is_nonempty(path))
        try:
            yield output
        except BaseException:
            if not output.kept:
                remove(staging)
                raise
            commit(staging, output.landing)
            raise
        commit(staging, path)


def read_text(path: str | Path, what: str) -> str:
    """An input text file's content; a folder or a file that is not UTF-8 text is a one-line error naming it (the
    output rule's other side: whatever a command reads, it names when it cannot)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {error.start}): give a JSONL file") from None


def write_text_atomically(path: str | Path, text: str) -> Path:
    """A text file written whole or not at all: a temporary file beside it, renamed into place (removed if the
    write fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def commit(staging: Path, target: Path) -> None:
    """Put the staging path in the target's place; the old target (if any) is removed whole. If the swap fails (a
    folder the user may not change), the target stays as it was and the staging path goes."""
    if not staging.exists():  # the command wrote nothing (a file output it chose not to write)
        return
    try:
        if target.is_dir():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except OSError:
                os.replace(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, target)  # a file (or nothing) is replaced in one step
    except OSError:
        remove(staging)
        raise


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_staging(path: Path) -> None:
    """Staging paths and half-swapped old targets that a killed run left beside `path` (we hold its lock, so no
    live run owns them)."""
    for leftover in path.parent.glob(f".{path.name}.*"):
        if leftover.name.endswith((STAGING_SUFFIX, ".old")):
            remove(leftover)


@contextlib.contextmanager
def held_lock(lock: Path, what: str, command: str = "rlm") -> Iterator[None]:
    """Hold `lock` (a file holding this process's pid) while the block runs. A lock that names a live process is
    an error naming `what` and the holder; one left by a dead process is taken over."""
    holder = lock_holder(lock)
    if holder is not None:
        pid, holding = holder
        raise FileExistsError(f"{what} is in use by another {holding} (pid {pid}); wait for it, or write "
                              "somewhere else")
    lock.unlink(missing_ok=True)  # no live holder: a lock left by a killed run, if any
    try:
        with open(lock, "x") as file:  # exclusive creation: of two runs starting together, one gets the lock
            file.write(f"{os.getpid()} {command}")
    except FileExistsError:
        raise FileExistsError(f"{what} is in use by another run that has just started; wait for it, or write "
                              "somewhere else") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def lock_holder(lock: Path) -> tuple[int, str] | None:
    """The pid and command of the live process that holds the lock ("PID COMMAND" in it), or None (no lock, or
    one left by a dead process)."""
    try:
        pid, _, command = lock.read_text().strip().partition(" ")
        pid = int(pid)
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, owned by another user
        pass
    return pid, command or "run"
