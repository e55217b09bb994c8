"""MiniStack's ceiling: its maximum rate of trip ``UpdateItem`` calls per second.

Client processes, each with a pool of threads, send the product's own
``UpdateItem`` requests (``build_update``) for new trip ids as fast as
MiniStack responds, for a fixed window. A level is a number of processes
times threads per process. Processes matter because a Python client spends
CPU of the same order building and parsing a request as MiniStack spends
serving it, and the threads of one process share one core under the GIL.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.processes import cpu_seconds
from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.events import parse_event
from taxi_pipeline.writes import KEY_ATTRIBUTE, build_update

DEFAULT_LEVELS: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (1, 16), (2, 8), (4, 8))
WARM_UP_CALLS = 3
START_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class CeilingLevel:
    """The rate one concurrency level reached."""

    processes: int
    threads: int
    calls: int
    errors: int
    seconds: float
    mean_latency_ms: float
    ministack_cpu_share: float | None

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def clients(self) -> int:
        return self.processes * self.threads

    def to_dict(self) -> dict[str, Any]:
        """Return the level as JSON-ready data."""
        return {
            "processes": self.processes,
            "threads": self.threads,
            "clients": self.clients,
            "calls": self.calls,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "calls_per_second": round(self.calls_per_second, 1),
            "mean_latency_ms": round(self.mean_latency_ms, 2),
            "ministack_cpu_share": None
            if self.ministack_cpu_share is None
            else round(self.ministack_cpu_share, 2),
        }


def base_requests(bodies: Sequence[tuple[str, bytes]], table_name: str) -> list[dict[str, Any]]:
    """Build the ``UpdateItem`` requests of events given as (kind, body) pairs."""
    return [build_update(parse_event(body, kind), table_name) for kind, body in bodies]


def _drive_updates(
    endpoint_url: str,
    region: str,
    requests: list[dict[str, Any]],
    key_prefix: str,
    threads: int,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """Send updates from ``threads`` threads for ``seconds`` after the barrier.

    The calls, errors and summed latency go onto the ``results`` queue.
    """
    settings = AwsSettings(region=region, endpoint_url=endpoint_url, max_attempts=1)
    client = settings.client("dynamodb", max_pool_connections=threads + 2)
    for index in range(WARM_UP_CALLS):
        client.update_item(**_with_key(requests[index % len(requests)], f"{key_prefix}-warm-{index}"))

    lock = threading.Lock()
    totals = {"calls": 0, "errors": 0, "latency": 0.0}
    barrier.wait(timeout=START_TIMEOUT_SECONDS)
    window_end = time.perf_counter() + seconds

    def work(thread_index: int) -> None:
        calls = errors = 0
        latency = 0.0
        number = 0
        while True:
            started = time.perf_counter()
            if started >= window_end:
                break
            request = _with_key(requests[number % len(requests)], f"{key_prefix}-{thread_index}-{number}")
            number += 1
            try:
                client.update_item(**request)
            except Exception:  # noqa: BLE001 - every failed call counts as an error, whatever its kind
                errors += 1
                continue
            finished = time.perf_counter()
            if finished <= window_end:
                calls += 1
                latency += finished - started
        with lock:
            totals["calls"] += calls
            totals["errors"] += errors
            totals["latency"] += latency

    workers = [threading.Thread(target=work, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(totals)


def _with_key(request: dict[str, Any], trip_id: str) -> dict[str, Any]:
    return {**request, "Key": {KEY_ATTRIBUTE: {"S": trip_id}}}


def measure_level(
    settings: AwsSettings,
    requests: list[dict[str, Any]],
    processes: int,
    threads: int,
    seconds: float,
    ministack_pid: int | None = None,
) -> CeilingLevel:
    """Run one level: ``processes`` client processes of ``threads`` threads each."""
    if processes < 1 or threads < 1:
        raise ValueError(f"level {processes}x{threads} is invalid: use at least 1 process and 1 thread")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    prefix = f"ceiling-{processes}x{threads}-{time.time_ns()}"
    children = [
        context.Process(
            target=_drive_updates,
            args=(
                settings.endpoint_url,
                settings.region,
                requests,
                f"{prefix}-{index}",
                threads,
                seconds,
                barrier,
                results,
            ),
            daemon=True,
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()

    try:
        barrier.wait(timeout=START_TIMEOUT_SECONDS)
        cpu_before = cpu_seconds(ministack_pid) if ministack_pid else None
        window_start = time.perf_counter()
        time.sleep(seconds)
        cpu_after = cpu_seconds(ministack_pid) if ministack_pid else None
        elapsed = time.perf_counter() - window_start

        totals = {"calls": 0, "errors": 0, "latency": 0.0}
        for _ in children:
            part = results.get(timeout=seconds + 60)
            for name in totals:
                totals[name] += part[name]
    except (threading.BrokenBarrierError, queue_module.Empty) as exc:
        raise RuntimeError(
            f"client processes of level {processes}x{threads} did not finish: {exc!r}"
        ) from exc
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()

    share = None
    if cpu_before is not None and cpu_after is not None:
        share = (cpu_after - cpu_before) / elapsed
    return CeilingLevel(
        processes=processes,
        threads=threads,
        calls=totals["calls"],
        errors=totals["errors"],
        seconds=seconds,
        mean_latency_ms=1000 * totals["latency"] / totals["calls"] if totals["calls"] else 0.0,
        ministack_cpu_share=share,
    )


def measure_ceiling(
    settings: AwsSettings,
    requests: list[dict[str, Any]],
    levels: Sequence[tuple[int, int]] = DEFAULT_LEVELS,
    seconds: float = 5.0,
    ministack_pid: int | None = None,
) -> list[CeilingLevel]:
    """Run every level in turn and return their results in the order run."""
    return [
        measure_level(settings, requests, processes, threads, seconds, ministack_pid)
        for processes, threads in levels
    ]


def best_level(levels: Sequence[CeilingLevel]) -> CeilingLevel:
    """Return the level with the highest rate."""
    return max(levels, key=lambda level: level.calls_per_second)
