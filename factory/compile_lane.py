"""Compiles a build's artifacts in a second process while the build verifies the ones compiled before them.

Compiling an artifact (torch.export, calibration, lowering, serialisation) is mostly one core of Python;
verifying one (running it on every held-out face) is mostly runtime kernels. One after the other they leave a
core idle half the time. A build hands every artifact's compile request to one worker process at the start:
the worker compiles them in the build's order while the build computes the PyTorch reference and verifies
each artifact as soon as its file is written (`CompileLane.take`). Nothing is compiled twice and the order of
the build's stage records is the same as compiling in line.

Every compile, in the worker or in line (quantisation triage's attempts), runs on one intra-op thread
(`one_thread`): calibration's forward passes then sum in the same order on any machine, so an int8 artifact's
bytes do not depend on the core count.

The worker starts from a forkserver (not a fork of the build, whose OpenCV and OpenMP thread pools a fork
would inherit without their threads) and is kept for later builds of the same process (the tests build many
times). It writes tool output to the build's log and returns the artifact's description and its stage
timings, which the build adds to its own log.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from factory.stages import StageLog, log_tail, output_to
from factory.targets import CompiledArtifact, CompileRequest, Target, get_target

# Intra-op threads of every compile (recorded in a build's inputs: it decides calibration's summation order).
COMPILE_THREADS = 1

_WORKER: ProcessPoolExecutor | None = None


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on `COMPILE_THREADS` intra-op threads (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(COMPILE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compile_here(target: Target, request: CompileRequest) -> CompiledArtifact:
    """Compile in this process, on one intra-op thread (see the module docstring)."""
    with one_thread():
        return target.compile(request)


def in_worker(target: Target) -> bool:
    """Whether `target` compiles in the worker: one of the factory's registered runtimes (a target registered
    at run time, such as a test's stand-in, exists only in this process)."""
    return bool(getattr(target, "compiles_in_worker", False))


def _compile_job(fmt: str, request: CompileRequest, log_path: Path | None) -> tuple[CompiledArtifact, list[dict]]:
    """In the worker: compile one artifact, with tool output appended to the build log."""
    log = StageLog(lambda _line: None, log_path)
    with output_to(log_path) if log_path is not None else nullcontext():
        return compile_here(get_target(fmt), replace(request, stages=log)), log.records


def _worker() -> ProcessPoolExecutor:
    global _WORKER
    if _WORKER is None:
        _WORKER = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
        atexit.register(_WORKER.shutdown, cancel_futures=True)
    return _WORKER


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until process `pid` is stopped (its /proc state `T` or `t`); give up after `timeout` seconds, or at
    once where there is no /proc (the block then starts as soon as the signal is sent)."""
    import time

    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("T", "t"):
            return
        time.sleep(0.001)


class CompileLane:
    """The compile requests of one `compile_and_verify` call, compiled in order in the worker."""

    def __init__(self, jobs: list[tuple[Target, CompileRequest]], log: StageLog) -> None:
        self.log = log
        self.futures: dict[Path, Future] = {}
        for target, request in jobs:
            if in_worker(target):
                # The build's stage log stays here (it prints to this process's console); the worker keeps its own.
                sent = replace(request, stages=StageLog(print, None))
                self.futures[request.output] = _worker().submit(_compile_job, target.format, sent, log.log_path)

    def take(self, target: Target, request: CompileRequest) -> CompiledArtifact:
        """The artifact of `request`: from the worker when it went there (waiting for it), else compiled now."""
        future = self.futures.pop(request.output, None)
        if future is None:
            return compile_here(target, request)
        try:
            artifact, records = future.result()
        except Exception:
            if self.log.log_path is not None:
                self.log.printer(f"compiling {request.label} FAILED; last lines of {self.log.log_path}:\n"
                                 f"{log_tail(self.log.log_path)}")
            raise
        for record in records:
            self.log.records.append({**record, "worker": True})
            self.log.printer(f"[{record['stage']}] {record['subject']} done in {record['seconds']:.1f} s "
                             "(compile worker)")
        return artifact

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Pause the worker for the block (a latency measurement must not share the cores with a compile).

        The worker is stopped with SIGSTOP and continued afterwards; a compile in progress just waits. SIGSTOP
        takes effect when the kernel next schedules the worker, which on busy cores can be a while after `kill`
        returns, so the block starts only once the worker is seen stopped.
        """
        # `_processes` (pid -> process) is the executor's own record of its workers; empty until the first submit.
        paused = list(_WORKER._processes or {}) if _WORKER is not None and self.futures else []
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        for pid in paused:
            _wait_stopped(pid)
        try:
            yield
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)

    def cancel(self) -> None:
        """Drop the compiles not yet started (the build stopped early)."""
        for future in self.futures.values():
            future.cancel()
        self.futures.clear()
