"""Memory and CPU readings of local processes from ``/proc`` (Linux only).

The replay benchmark needs the peak resident memory of the Spark driver's
JVM and of the Python workers. They are children of the driver that it
never waits for, so ``getrusage`` cannot report them, and
``ProcessSampler`` reads them periodically instead.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


@dataclass(frozen=True)
class ProcessReading:
    """One process at one instant: its resident memory and CPU time so far."""

    pid: int
    ppid: int
    command: str
    rss_bytes: int
    cpu_seconds: float


def read_process(pid: int) -> ProcessReading | None:
    """Read one process from ``/proc``, or return ``None`` if it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None

    # The second field (the command name) is in brackets and may contain
    # spaces, so the fields are counted from the last closing bracket.
    fields = stat[stat.rfind(")") + 2 :].split()
    ppid = int(fields[1])
    cpu_ticks = int(fields[11]) + int(fields[12])
    rss_pages = int(fields[21])
    return ProcessReading(
        pid=pid,
        ppid=ppid,
        command=command.strip(),
        rss_bytes=rss_pages * PAGE_SIZE,
        cpu_seconds=cpu_ticks / CLOCK_TICKS,
    )


def read_all_processes() -> dict[int, ProcessReading]:
    """Read every process visible in ``/proc``."""
    readings: dict[int, ProcessReading] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            reading = read_process(int(entry))
            if reading is not None:
                readings[reading.pid] = reading
    return readings


def descendants(root: int, readings: dict[int, ProcessReading]) -> list[ProcessReading]:
    """Return every process below ``root`` in the process tree, children first."""
    children: dict[int, list[ProcessReading]] = {}
    for reading in readings.values():
        children.setdefault(reading.ppid, []).append(reading)

    found: list[ProcessReading] = []
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child.pid)
    return found


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Return a process's peak resident memory (``VmHWM``) from ``/proc/<pid>/status``.

    Unlike ``ru_maxrss``, which Linux keeps across ``execve`` and so starts
    from the high-water mark of the process that forked, ``VmHWM`` belongs
    to the address space the program runs in now.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmHWM line")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user plus system) a process has used, or 0 if it has exited."""
    reading = read_process(pid)
    return reading.cpu_seconds if reading is not None else 0.0


def is_jvm(reading: ProcessReading) -> bool:
    """Tell the Spark driver's JVM from other descendants by its command line."""
    return "java" in reading.command.split(" ", 1)[0] or "SparkSubmit" in reading.command


@dataclass
class SampledPeaks:
    """Peaks and CPU times of a Spark driver process and the processes below it.

    ``root`` is the driver's Python process. ``worker_cpu_seconds`` keeps
    the last reading of every Python worker seen, so workers that exited
    between samples still count up to their last sample.
    ``root_rss_timeline`` contains (seconds since the first sample, MiB) pairs.
    """

    root_peak_rss_bytes: int = 0
    jvm_peak_rss_bytes: int = 0
    workers_peak_rss_bytes: int = 0
    jvm_cpu_seconds: float = 0.0
    worker_cpu_seconds: dict[int, float] = field(default_factory=dict)
    root_rss_timeline: list[tuple[float, float]] = field(default_factory=list)
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the peaks in MiB, the CPU times in seconds and the driver's memory over time."""
        return {
            "driver_sampled_peak_rss_mib": round(self.root_peak_rss_bytes / MIB, 1),
            "jvm_peak_rss_mib": round(self.jvm_peak_rss_bytes / MIB, 1),
            "python_workers_peak_rss_mib": round(self.workers_peak_rss_bytes / MIB, 1),
            "jvm_cpu_seconds": round(self.jvm_cpu_seconds, 2),
            "python_workers_cpu_seconds": round(sum(self.worker_cpu_seconds.values()), 2),
            "driver_rss_timeline_mib": self.root_rss_timeline,
            "samples": self.samples,
        }


class ProcessSampler:
    """Sample a driver process, its JVM and the JVM's Python workers.

    Used as a context manager it samples from a background thread every
    ``interval_seconds``. Run it in another process than the driver, so
    the sampling costs the measured driver neither CPU nor memory. The
    Python workers are the JVM's descendants (the Python daemon and the
    workers it forks); their resident memory is summed per sample.
    """

    def __init__(
        self, root: int | None = None, interval_seconds: float = 0.2, timeline_seconds: float = 2.0
    ) -> None:
        self.root = os.getpid() if root is None else root
        self.interval_seconds = interval_seconds
        self.timeline_seconds = timeline_seconds
        self.peaks = SampledPeaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._next_timeline = 0.0

    def sample(self) -> None:
        """Take one sample now."""
        with self._lock:
            self._sample()

    def cpu_snapshot(self) -> tuple[float, float]:
        """Take a sample now and return the CPU seconds of the JVM and of the Python workers so far."""
        with self._lock:
            self._sample()
            return self.peaks.jvm_cpu_seconds, sum(self.peaks.worker_cpu_seconds.values())

    def _sample(self) -> None:
        readings = read_all_processes()
        below = descendants(self.root, readings)
        jvms = [reading for reading in below if is_jvm(reading)]
        jvm_pids = {reading.pid for reading in jvms}
        # Everything below the JVM is a Python worker: the daemon and its forks.
        workers = [
            worker for jvm in jvms for worker in descendants(jvm.pid, readings) if worker.pid not in jvm_pids
        ]

        peaks = self.peaks
        peaks.samples += 1
        root = readings.get(self.root)
        if root is not None:
            peaks.root_peak_rss_bytes = max(peaks.root_peak_rss_bytes, root.rss_bytes)
            elapsed = time.monotonic() - self._started
            if elapsed >= self._next_timeline:
                peaks.root_rss_timeline.append((round(elapsed, 1), round(root.rss_bytes / MIB, 1)))
                self._next_timeline = elapsed + self.timeline_seconds
        if jvms:
            peaks.jvm_peak_rss_bytes = max(
                peaks.jvm_peak_rss_bytes, sum(reading.rss_bytes for reading in jvms)
            )
            peaks.jvm_cpu_seconds = sum(reading.cpu_seconds for reading in jvms)
        peaks.workers_peak_rss_bytes = max(
            peaks.workers_peak_rss_bytes, sum(reading.rss_bytes for reading in workers)
        )
        for reading in workers:
            peaks.worker_cpu_seconds[reading.pid] = reading.cpu_seconds

    def __enter__(self) -> ProcessSampler:
        def run() -> None:
            while not self._stop.wait(self.interval_seconds):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=run, name="process-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def load_average() -> tuple[float, float, float]:
    """Return the 1, 5 and 15 minute load averages, rounded to two decimals."""
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))
