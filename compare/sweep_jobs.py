"""A sweep's runs in N worker processes (`compare sweep --jobs N`), each with its share of the CPU.

    run_parallel(runs, todo, jobs, finished, say)   # finished(i, row) as each run ends

Workers are started with `spawn` (a fresh interpreter: forking a process whose torch thread pool
is running can hang), set torch.set_num_threads(max(1, cpus // jobs)), and train one setting at a
time through ablation.run_setting, exactly as the sequential sweep does, so a run gives the same
row in either (a test checks it). The parent hands out one run at a time over a pipe and takes the
row back. A worker's console output (train's progress bar and summary) goes to
<run folder>/console.log instead of the terminal, where N bars would interleave.

Ctrl-C: each worker runs in its own process group, so the terminal's SIGINT reaches only the
parent, which then sends ONE SIGINT to every busy worker (train stops there cleanly, TrainInterrupted,
as in a sequential sweep), keeps the rows that still arrive, waits for the workers to exit (and
kills one that does not within STOP_WAIT_S), and re-raises KeyboardInterrupt. A worker whose
parent is gone exits after its current run (its pipe is closed). A worker that dies gives its run
an error row and is replaced.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Optional

CONSOLE = "console.log"
STOP_WAIT_S = 60.0  # how long an interrupted worker may take to stop its run before it is killed


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset or a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Worker:
    """One worker process, its end of the pipe, and the index of the run it is training (or None)."""

    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_work, args=(child, threads), daemon=True)
        self.process.start()
        child.close()  # the parent's copy: EOF on self.conn then means the worker is gone
        self.task: Optional[int] = None


def run_parallel(runs: list, todo: list[int], jobs: int, finished: Callable[[int, dict], None],
                 say: Callable[[str], None]) -> None:
    """Train runs[i] for every i in `todo` in `jobs` worker processes; call finished(i, row) as
    each ends. KeyboardInterrupt: stops every worker (see the module docstring), then re-raised."""
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, cpus() // jobs)
    queue = list(todo)
    workers: list[_Worker] = []

    def give(w: _Worker) -> None:
        w.task = queue.pop(0) if queue else None
        if w.task is None:
            w.conn.send(None)  # no more work: the worker exits
            return
        r = runs[w.task]
        say(f"run {w.task + 1}/{len(runs)}: {r.setting} (worker {w.process.pid}, {threads} thread(s))")
        w.conn.send((r.setting, r.config, r.key))

    try:
        for _ in range(min(jobs, len(queue))):
            workers.append(_Worker(ctx, threads))
            give(workers[-1])
        while any(w.task is not None for w in workers):
            busy = {w.conn: w for w in workers if w.task is not None}
            for conn in wait(list(busy)):
                w = busy[conn]
                row, died = _receive(w, runs[w.task])
                finished(w.task, row)
                if died:  # its run has its error row; a new worker takes the rest of the queue
                    workers.remove(w)
                    w.task = None
                    if not queue:
                        continue
                    workers.append(_Worker(ctx, threads))
                    w = workers[-1]
                give(w)
    except KeyboardInterrupt:
        _stop(workers, runs, finished)
        raise
    finally:
        for w in workers:
            w.process.join(timeout=5 if w.task is None else 0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()


def _receive(w: _Worker, run) -> tuple[dict, bool]:
    """(the row the worker sends back, False), or (an error row, True) when its pipe closed: the
    worker died (killed for memory, a crash in native code)."""
    from .ablation import METRICS

    try:
        return w.conn.recv(), False
    except (EOFError, OSError):
        w.process.join(timeout=5)
        return {**run.setting, **{m: None for m in METRICS}, "seconds": None,
                "error": f"the worker process died (exit code {w.process.exitcode}) while training this setting",
                "output_dir": run.config.output_dir}, True


def _stop(workers: list[_Worker], runs: list, finished: Callable[[int, dict], None]) -> None:
    """Ctrl-C: one SIGINT to each busy worker, keep the rows that still arrive, wait, kill stragglers."""
    for w in workers:
        if w.task is not None and w.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        busy = {w.conn: w for w in workers if w.task is not None}
        if not busy:
            break
        for conn in wait(list(busy), timeout=max(0.0, deadline - time.monotonic())):
            w = busy[conn]
            try:
                row = conn.recv()
            except (EOFError, OSError):  # interrupted: it stopped without a row
                w.task = None
                continue
            finished(w.task, row)  # it finished just before the signal
            w.task = None
    for w in workers:
        w.task = None  # the finally of run_parallel joins (and kills what is still running)


# ---- the worker process -------------------------------------------------------------------------------
def _work(conn, threads: int) -> None:
    """A worker's life: own process group, its thread share, then one run per message until None."""
    try:
        os.setpgrp()  # the terminal's Ctrl-C goes to the parent alone, which forwards one SIGINT
        import torch

        torch.set_num_threads(threads)
        from .ablation import _train, run_setting

        train, _ = _train()
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if task is None:
                return
            setting, cfg, key = task
            with _console(Path(cfg.output_dir) / CONSOLE):
                row = run_setting(train, setting, cfg, key)
            conn.send(row)
    except KeyboardInterrupt:  # the parent's SIGINT: the run stopped cleanly, no row to send
        sys.exit(130)


@contextlib.contextmanager
def _console(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2) to `path` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
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
