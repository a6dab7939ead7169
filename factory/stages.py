"""The build pipeline's explicit stages, each printed with its wall time."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class Stage(enum.Enum):
    """Build stages, in pipeline order."""

    LOAD = "load"
    EXPORT = "torch.export"
    QUANTIZE = "quantise"
    LOWER = "lower"
    SERIALIZE = "serialise"
    VERIFY = "verify"
    REPORT = "report"


@dataclass
class StageLog:
    """Times each stage and prints a line when it ends."""

    printer: Callable[[str], None] = print
    records: list[dict[str, object]] = field(default_factory=list)

    @contextmanager
    def stage(self, stage: Stage, subject: str = "") -> Iterator[None]:
        started = time.perf_counter()
        label = f"[{stage.value}] {subject}".rstrip()
        self.printer(f"{label} ...")
        yield
        seconds = time.perf_counter() - started
        self.records.append({"stage": stage.value, "subject": subject, "seconds": round(seconds, 2)})
        self.printer(f"{label} done in {seconds:.1f} s")
