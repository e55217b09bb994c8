"""Estimate the replay job's throughput on AWS Glue from the figures measured locally.

This is an estimate, not a measurement. It combines the CPU that the replay
job's Python workers and JVM spent per message here, and the Spark overhead
per wave measured here, with assumed request latencies and the published
service limits below. It assumes that one G.1X worker runs the Spark driver
and every other worker one executor with 4 task slots (4 vCPUs). It also
assumes that requests within a region take ``LATENCIES_MS`` and that a vCPU
there does as much per second as a core of the machine that measured.
"""

from __future__ import annotations

from typing import Any

# AWS Glue worker types: G.1X is 1 DPU, 4 vCPUs and 16 GB of memory.
VCPUS_PER_G1X = 4
WORKER_COUNTS = (2, 3, 5, 10, 20, 40)
LATENCIES_MS = (5.0, 10.0)
# An on-demand DynamoDB table serves at most 40,000 write request units per
# second by default (Developer Guide, "Quotas in Amazon DynamoDB"). A new
# on-demand table sustains up to 4,000 writes per second and then scales to
# twice its previous peak (Developer Guide, "DynamoDB on-demand capacity
# mode"). One partition serves at most 1,000 write request units per second,
# which random trip ids never come near for a single partition.
TABLE_WRITE_QUOTA = 40_000
NEW_TABLE_WRITES = 4_000
# A standard SQS queue keeps about 120,000 messages in flight at most, so a
# wave stays well below that.
MAX_WAVE_SIZE = 100_000
# The wave size per task slot that the scaled-wave column assumes.
WAVE_PER_SLOT = 2_500
SQS_BATCH = 10
DEFAULT_BACKLOG = 1_000_000


def _replay_options() -> dict[str, Any]:
    from taxi_pipeline.replay import ReplayOptions

    defaults = ReplayOptions(queue_url="unused", table_name="unused")
    return {
        # The smallest wave the job uses; larger clusters get larger waves by default.
        "wave_size": defaults.wave_size or 10_000,
        "receive_threads": defaults.receive_threads,
        "write_threads": defaults.write_threads,
        "wait_time_seconds": defaults.wait_time_seconds,
        "max_empty_waves": defaults.max_empty_waves,
    }


def _smallest_run(results: dict[str, Any]) -> dict[str, Any] | None:
    runs = [run for run in results.get("replay", []) if run.get("job")]
    return min(runs, key=lambda run: run["depth"]) if runs else None


def cpu_per_message(results: dict[str, Any]) -> tuple[float, float, str]:
    """Return the Python workers' and the JVM's CPU seconds per message, and how they were found.

    With two or more runs the cost is the difference between the two largest
    runs divided by the difference in messages, which leaves out what every
    run spends once (starting workers, compiling code, waiting on empty
    polls). With one run it is that run's CPU divided by its messages.
    """
    runs = sorted((run for run in results.get("replay", []) if run.get("job")), key=lambda run: run["depth"])
    if len(runs) >= 2:
        small, large = runs[-2], runs[-1]
        messages = large["depth"] - small["depth"]
        python = (
            large["job"]["cpu_seconds_during_run"]["python_workers"]
            - small["job"]["cpu_seconds_during_run"]["python_workers"]
        )
        jvm = large["job"]["cpu_seconds_during_run"]["jvm"] - small["job"]["cpu_seconds_during_run"]["jvm"]
        if messages > 0 and python > 0 and jvm > 0:
            return (
                python / messages,
                jvm / messages,
                f"difference between the runs at {large['depth']:,} and {small['depth']:,}",
            )
    run = runs[-1]
    cpu = run["job"]["cpu_seconds_during_run"]
    return cpu["python_workers"] / run["depth"], cpu["jvm"] / run["depth"], f"the run at {run['depth']:,}"


def wave_overhead_seconds(run: dict[str, Any]) -> float | None:
    """Return the Spark time of the first wave outside the receive and write steps.

    Parse, dead-letter, collapse and the driver's time between jobs: work
    that Spark does per wave whatever the task slots are doing.
    """
    waves = run["job"].get("profile", {}).get("waves") or []
    if not waves:
        return None
    wave = waves[0]
    steps = wave["steps"]
    overhead = sum(seconds for step, seconds in steps.items() if step not in ("receive", "write + delete"))
    return overhead + wave["driver_seconds_between_jobs"]


def writes_per_message(results: dict[str, Any]) -> float:
    """Return the UpdateItem calls per message of the replay run with the most waves.

    Duplicates within a wave collapse into one write. Across waves each copy
    is written and fails its condition, which still consumes a write unit.
    """
    runs = [run for run in results.get("replay", []) if run.get("job")]
    run = max(runs, key=lambda run: (run["job"]["report"]["waves"], run["depth"]))
    steps = {step["step"]: step for step in run["job"].get("profile", {}).get("steps", [])}
    updates = steps.get("write + delete", {}).get("aws_calls", {}).get("UpdateItem", {}).get("calls")
    if updates:
        return updates / run["depth"]
    return run["workload"]["distinct_events"] / run["workload"]["messages"]


def drain_rate(backlog: int, wave: int, work_rate: float, wave_overhead: float, end_of_queue: float) -> float:
    """Return messages per second for draining ``backlog`` in waves of ``wave`` messages."""
    waves = -(-backlog // wave)
    seconds = waves * (wave_overhead + wave / work_rate) + end_of_queue
    return backlog / seconds


def scaled_wave_size(slots: int) -> int:
    """Return the job's default wave for ``slots`` task slots."""
    from taxi_pipeline.replay.job import default_wave_size

    return default_wave_size(slots)


def estimate_glue_throughput(results: dict[str, Any], backlog: int = DEFAULT_BACKLOG) -> dict[str, Any]:
    """Return estimated messages per second on G.1X workers, per worker count, with their inputs."""
    smallest = _smallest_run(results)
    if smallest is None:
        return {"available": False, "reason": "no replay run was measured"}

    options = _replay_options()
    python_cpu_per_message, jvm_cpu_per_message, cpu_basis = cpu_per_message(results)
    writes = writes_per_message(results)
    wave_overhead = wave_overhead_seconds(smallest) or 0.0
    # When the queue runs dry within a wave, every receive thread waits for
    # two empty long polls, and the empty wave that follows waits for two more.
    end_of_queue = 4 * options["wait_time_seconds"]

    io_rate_per_slot = {}
    for latency_ms in LATENCIES_MS:
        latency = latency_ms / 1000
        # A write thread spends one UpdateItem and a tenth of a DeleteMessageBatch
        # per message, and a receive thread a tenth of a ReceiveMessage.
        write_seconds = (latency + latency / SQS_BATCH) / options["write_threads"]
        receive_seconds = latency / (options["receive_threads"] * SQS_BATCH)
        io_rate_per_slot[latency_ms] = 1 / (write_seconds + receive_seconds)

    rows = []
    for workers in WORKER_COUNTS:
        slots = VCPUS_PER_G1X * (workers - 1)
        limits = {
            f"task I/O at {max(LATENCIES_MS):.0f} ms": slots * io_rate_per_slot[max(LATENCIES_MS)],
            "executor CPU": slots / (python_cpu_per_message + jvm_cpu_per_message),
            "DynamoDB table quota": TABLE_WRITE_QUOTA / writes,
        }
        binding = min(limits, key=limits.get)
        work_rate = limits[binding]
        default_wave = options["wave_size"]
        scaled_wave = scaled_wave_size(slots)
        default_drain = drain_rate(backlog, default_wave, work_rate, wave_overhead, end_of_queue)
        overhead_share = wave_overhead / (wave_overhead + default_wave / work_rate)
        rows.append(
            {
                "workers": workers,
                "slots": slots,
                "io_rate": {
                    f"{latency:.0f}": round(slots * rate) for latency, rate in io_rate_per_slot.items()
                },
                "cpu_rate": round(limits["executor CPU"]),
                "table_quota_rate": round(limits["DynamoDB table quota"]),
                "work_rate": round(work_rate),
                "binding_in_wave": binding,
                "default_wave_drain": round(default_drain),
                "default_wave_overhead_share": round(overhead_share, 2),
                "scaled_wave": scaled_wave,
                "scaled_wave_drain": round(
                    drain_rate(backlog, scaled_wave, work_rate, wave_overhead, end_of_queue)
                ),
            }
        )

    return {
        "available": True,
        "backlog": backlog,
        "options": options,
        "cpu_basis": cpu_basis,
        "python_cpu_ms_per_message": round(1000 * python_cpu_per_message, 3),
        "jvm_cpu_ms_per_message": round(1000 * jvm_cpu_per_message, 3),
        "writes_per_message": round(writes, 3),
        "wave_overhead_seconds": round(wave_overhead, 2),
        "wave_overhead_depth": smallest["depth"],
        "end_of_queue_seconds": end_of_queue,
        "io_rate_per_slot": {f"{latency:.0f}": round(rate) for latency, rate in io_rate_per_slot.items()},
        "max_wave_size": MAX_WAVE_SIZE,
        "wave_per_slot": WAVE_PER_SLOT,
        "new_table_writes": NEW_TABLE_WRITES,
        "new_table_rate": round(NEW_TABLE_WRITES / writes),
        "rows": rows,
    }
