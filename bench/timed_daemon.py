"""PySpark's Python daemon with a timer around every AWS call the tasks make.

Spark starts it in place of ``pyspark.daemon`` when
``spark.python.daemon.module`` is ``bench.timed_daemon``. Every forked
Python worker appends one JSON line per task to
``$BENCH_CALL_LOG_DIR/<pid>.jsonl``: the task's start (when its first bytes
arrive) and end, in epoch seconds, and, per AWS operation, the calls made during the task and the
seconds spent in them, summed over the task's threads.

The timer costs two ``perf_counter`` calls and a lock per AWS call, a few
microseconds against calls of a millisecond or more. botocore is patched
when a worker runs its first task, which imports it a little earlier than
the task itself would.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyspark.daemon as daemon

CALL_LOG_VARIABLE = "BENCH_CALL_LOG_DIR"

_lock = threading.Lock()
_calls: dict[str, list[float]] = {}
_patched_pid: int | None = None
_run_task = daemon.worker_main


def _patch_botocore() -> None:
    """Wrap ``BaseClient._make_api_call`` once per worker process."""
    global _patched_pid
    if _patched_pid == os.getpid():
        return
    import botocore.client

    make_api_call = botocore.client.BaseClient._make_api_call
    if getattr(make_api_call, "bench_timed", False):
        _patched_pid = os.getpid()
        return

    def timed_api_call(self, operation_name, api_params):
        started = time.perf_counter()
        try:
            return make_api_call(self, operation_name, api_params)
        finally:
            elapsed = time.perf_counter() - started
            with _lock:
                totals = _calls.setdefault(operation_name, [0, 0.0])
                totals[0] += 1
                totals[1] += elapsed

    timed_api_call.bench_timed = True
    botocore.client.BaseClient._make_api_call = timed_api_call
    _patched_pid = os.getpid()


def _snapshot() -> dict[str, tuple[int, float]]:
    with _lock:
        return {operation: (int(count), seconds) for operation, (count, seconds) in _calls.items()}


def _append_task_record(started: float, ended: float, before: dict[str, tuple[int, float]]) -> None:
    folder = os.environ.get(CALL_LOG_VARIABLE)
    if not folder:
        return
    calls = {}
    for operation, (count, seconds) in _snapshot().items():
        previous_count, previous_seconds = before.get(operation, (0, 0.0))
        if count > previous_count:
            calls[operation] = [count - previous_count, round(seconds - previous_seconds, 6)]
    record = {"pid": os.getpid(), "start": started, "end": ended, "calls": calls}
    with open(Path(folder) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record, separators=(",", ":")) + "\n")


class _ArrivalClock:
    """Wrap a worker's input stream and note when the task's first bytes were read.

    A reused worker calls ``pyspark.worker.main`` as soon as its previous
    task ends, and it then blocks until the next task arrives, so the task
    starts at its first read, not at the call.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.first_read_at: float | None = None

    def read(self, *args):
        data = self._stream.read(*args)
        if self.first_read_at is None:
            self.first_read_at = time.time()
        return data

    def __getattr__(self, name):
        return getattr(self._stream, name)


def timed_worker_main(infile, outfile) -> None:
    """Run one task as ``pyspark.worker.main`` does and record its AWS calls."""
    _patch_botocore()
    before = _snapshot()
    clock = _ArrivalClock(infile)
    called = time.time()
    try:
        _run_task(clock, outfile)
    finally:
        _append_task_record(clock.first_read_at or called, time.time(), before)


daemon.worker_main = timed_worker_main

if __name__ == "__main__":
    daemon.manager()
