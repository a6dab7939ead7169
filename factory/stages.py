"""The build pipeline's explicit stages, each printed with its wall time.

The converters print a lot (progress bars, deprecation notes, MLIR dumps). A build sends the
process's stdout and stderr file descriptors to its build log (`output_to`) and prints its own lines
to a console stream saved beforehand (`console_printer`), so the console shows one line per stage;
when a stage fails, the log's tail is shown with the error.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from factory.errors import FactoryError


class Stage(enum.Enum):
    """Labels of a build's timed log lines. Not an order: every artifact is exported, quantised, lowered and
    serialised in turn, and verification steps come between."""

    LOAD = "load"
    EXPORT = "torch.export"
    QUANTIZE = "quantise"
    LOWER = "lower"
    SERIALIZE = "serialise"
    VERIFY = "verify"
    TRIAGE = "triage"
    REPORT = "report"


@contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (also by C++ code) to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with log_path.open("ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def console_printer() -> Callable[[str], None]:
    """A printer bound to the current stdout, which keeps working after `output_to` redirects it."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", buffering=1)

    def say(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return say


def log_tail(log_path: Path, lines: int = 25) -> str:
    """The last lines of a log file ("" if there is none)."""
    if not log_path.is_file():
        return ""
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class StageLog:
    """Times each stage, prints a line when it starts and ends, and keeps tool chatter in `log_path`."""

    printer: Callable[[str], None] = print
    log_path: Path | None = None
    records: list[dict[str, object]] = field(default_factory=list)

    @contextmanager
    def stage(self, stage: Stage, subject: str = "") -> Iterator[None]:
        started = time.perf_counter()
        label = f"[{stage.value}] {subject}".rstrip()
        self.printer(f"{label} ...")
        if self.log_path is not None:
            with self.log_path.open("a") as log:
                log.write(f"==== {label}\n")
        try:
            yield
        except FactoryError:
            raise  # a user-input problem: its message says what to fix, the tool log adds nothing
        except Exception:
            if self.log_path is not None:
                self.printer(f"{label} FAILED; last lines of {self.log_path}:\n{log_tail(self.log_path)}")
            raise
        seconds = time.perf_counter() - started
        self.records.append({"stage": stage.value, "subject": subject, "seconds": round(seconds, 2)})
        self.printer(f"{label} done in {seconds:.1f} s")
