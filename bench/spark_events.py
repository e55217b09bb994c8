"""Break a replay or backfill run into steps, from Spark's event log and the task call log.

Spark writes one JSON event per line to ``spark.eventLog.dir``. A wave of
the replay job runs these Spark jobs, in this order:

* ``count`` jobs (Spark records no Python call site for a DataFrame
  count): the receive tasks, then the count of the persisted messages;
* ``javaToPython`` jobs before the dead-letter job: the parse of the
  persisted messages, which adaptive query execution runs when a
  DataFrame is turned into an RDD;
* the ``collect`` started at the dead-letter line of
  ``taxi_pipeline/replay/job.py`` (Spark records the line as the job's
  call site);
* ``javaToPython`` jobs after it: the shuffles that collapse duplicates
  and place each trip in one partition;
* the ``collect`` started at the write line: writes and deletes.

``bench.timed_daemon`` adds, per Python task, its wall time and the AWS
calls it made. A task belongs to the job whose time window contains the
task's midpoint.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECEIVE = "receive"
PARSE = "parse"
DEAD_LETTER = "dead-letter"
COLLAPSE = "collapse + shuffle"
WRITE_DELETE = "write + delete"
BACKFILL_READ = "read + parse"
BACKFILL_REPORT = "count invalid rows"
BACKFILL_WRITE = "write"
OTHER = "other"
REPLAY_STEPS = (RECEIVE, PARSE, DEAD_LETTER, COLLAPSE, WRITE_DELETE)

# Source text that starts a step's Spark job in taxi_pipeline.replay.
_STEP_SOURCES = (
    ("mapPartitions(dead_letter_task", DEAD_LETTER),
    ("mapPartitions(writer)", WRITE_DELETE),
)
_CALL_SITE = re.compile(r"^(?P<action>\w+) at (?P<file>.+?):(?P<line>\d+)$")


def step_lines() -> dict[tuple[str, int], str]:
    """Map (file name, line number) in ``taxi_pipeline.replay`` to the step whose job starts there.

    In ``run_backfill`` the write settles no messages, and its other
    collects count and sample the invalid rows.
    """
    import importlib

    labels: dict[tuple[str, int], str] = {}
    for module_name in ("taxi_pipeline.replay.job", "taxi_pipeline.replay.backfill"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        lines, first = inspect.getsourcelines(module)
        # For a whole module inspect returns 0 as the first line number.
        first = max(first, 1)
        file_name = Path(inspect.getsourcefile(module)).name
        function = ""
        for offset, text in enumerate(lines):
            key = (file_name, first + offset)
            if text.startswith("def "):
                function = text[4:].split("(", 1)[0]
            if function == "run_backfill" and ".collect()" in text:
                labels[key] = BACKFILL_REPORT
            for needle, label in _STEP_SOURCES:
                if needle in text:
                    labels[key] = BACKFILL_WRITE if function == "run_backfill" else label
    return labels


@dataclass
class StageTimes:
    """One stage's wall time and the summed metrics of its tasks."""

    stage_id: int
    name: str
    tasks: int = 0
    submitted_ms: int | None = None
    completed_ms: int | None = None
    executor_run_ms: int = 0
    executor_cpu_ms: float = 0.0
    deserialize_ms: int = 0
    gc_ms: int = 0
    shuffle_write_bytes: int = 0

    @property
    def seconds(self) -> float:
        if self.submitted_ms is None or self.completed_ms is None:
            return 0.0
        return (self.completed_ms - self.submitted_ms) / 1000


@dataclass
class JobTimes:
    """One Spark job: its step, window and stages, and the Python tasks that ran in it."""

    job_id: int
    call_site: str
    submitted_ms: int
    label: str = OTHER
    completed_ms: int | None = None
    stage_ids: list[int] = field(default_factory=list)
    python_tasks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return 0.0 if self.completed_ms is None else (self.completed_ms - self.submitted_ms) / 1000


def read_events(folder: Path) -> list[dict[str, Any]]:
    """Read every event of the one event log in ``folder``."""
    logs = [path for path in Path(folder).iterdir() if path.is_file()]
    if len(logs) != 1:
        raise FileNotFoundError(f"expected one Spark event log in {folder}, found {len(logs)}")
    with logs[0].open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_task_records(folder: Path) -> list[dict[str, Any]]:
    """Read the per-task records of ``bench.timed_daemon`` from every worker's file."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle if line.strip())
    return records


def label_jobs(jobs: list[JobTimes], backfill: bool = False) -> None:
    """Name the step of every job from its call site and its place in the wave."""
    labels = step_lines()
    dead_letter_seen = False
    for job in jobs:
        match = _CALL_SITE.match(job.call_site.strip())
        action = match["action"] if match else ""
        if match and "taxi_pipeline/replay/" in match["file"]:
            key = (Path(match["file"]).name, int(match["line"]))
            job.label = labels.get(key, f"{action} at {key[0]}:{key[1]}")
        elif action == "count":
            job.label = BACKFILL_READ if backfill else RECEIVE
        elif action == "javaToPython":
            job.label = COLLAPSE if (dead_letter_seen or backfill) else PARSE
        else:
            job.label = OTHER

        if job.label == RECEIVE:
            dead_letter_seen = False
        elif job.label == DEAD_LETTER:
            dead_letter_seen = True


def collect_jobs(
    events: Iterable[dict[str, Any]], backfill: bool = False
) -> tuple[list[JobTimes], dict[int, StageTimes]]:
    """Build the jobs and stages of a run from its events, each job named by its step."""
    jobs: dict[int, JobTimes] = {}
    stages: dict[int, StageTimes] = {}

    for event in events:
        kind = event.get("Event")
        if kind == "SparkListenerJobStart":
            infos = event.get("Stage Infos", [])
            properties = event.get("Properties", {})
            call_site = properties.get("callSite.short") or (infos[-1]["Stage Name"] if infos else "")
            job = JobTimes(
                job_id=event["Job ID"],
                call_site=call_site,
                submitted_ms=event["Submission Time"],
                stage_ids=list(event.get("Stage IDs", [])),
            )
            jobs[job.job_id] = job
        elif kind == "SparkListenerJobEnd":
            if event["Job ID"] in jobs:
                jobs[event["Job ID"]].completed_ms = event["Completion Time"]
        elif kind == "SparkListenerStageCompleted":
            info = event["Stage Info"]
            stage = stages.setdefault(info["Stage ID"], StageTimes(info["Stage ID"], info["Stage Name"]))
            stage.submitted_ms = info.get("Submission Time")
            stage.completed_ms = info.get("Completion Time")
        elif kind == "SparkListenerTaskEnd":
            metrics = event.get("Task Metrics") or {}
            stage = stages.setdefault(event["Stage ID"], StageTimes(event["Stage ID"], ""))
            stage.tasks += 1
            stage.executor_run_ms += metrics.get("Executor Run Time", 0)
            stage.executor_cpu_ms += metrics.get("Executor CPU Time", 0) / 1e6
            stage.deserialize_ms += metrics.get("Executor Deserialize Time", 0)
            stage.gc_ms += metrics.get("JVM GC Time", 0)
            stage.shuffle_write_bytes += (metrics.get("Shuffle Write Metrics") or {}).get(
                "Shuffle Bytes Written", 0
            )

    ordered = sorted(jobs.values(), key=lambda job: job.submitted_ms)
    label_jobs(ordered, backfill)
    return ordered, stages


def attach_tasks(jobs: list[JobTimes], records: Iterable[dict[str, Any]]) -> int:
    """Give each Python task record to the job whose window contains its midpoint.

    Returns the number of records that fall outside every job.
    """
    unplaced = 0
    for record in records:
        middle_ms = 500 * (record["start"] + record["end"])
        for job in jobs:
            if job.completed_ms is not None and job.submitted_ms <= middle_ms <= job.completed_ms:
                job.python_tasks.append(record)
                break
        else:
            unplaced += 1
    return unplaced


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Return the length of the union of time intervals, in seconds."""
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def summarise_steps(jobs: list[JobTimes], stages: dict[int, StageTimes]) -> list[dict[str, Any]]:
    """Sum the jobs of each step: wall time, Python busy time, JVM time and AWS calls."""
    steps: dict[str, dict[str, Any]] = {}
    for job in jobs:
        step = steps.setdefault(
            job.label,
            {
                "step": job.label,
                "jobs": 0,
                "stages": 0,
                "tasks": 0,
                "seconds": 0.0,
                "python_busy_seconds": 0.0,
                "python_task_seconds": 0.0,
                "jvm_executor_cpu_seconds": 0.0,
                "jvm_gc_seconds": 0.0,
                "shuffle_write_mib": 0.0,
                "aws_calls": defaultdict(lambda: [0, 0.0]),
            },
        )
        step["jobs"] += 1
        step["seconds"] += job.seconds
        step["python_busy_seconds"] += busy_seconds((task["start"], task["end"]) for task in job.python_tasks)
        step["python_task_seconds"] += sum(task["end"] - task["start"] for task in job.python_tasks)
        for stage_id in job.stage_ids:
            stage = stages.get(stage_id)
            if stage is None or stage.completed_ms is None:
                continue  # skipped: its output was already computed by an earlier job
            step["stages"] += 1
            step["tasks"] += stage.tasks
            step["jvm_executor_cpu_seconds"] += stage.executor_cpu_ms / 1000
            step["jvm_gc_seconds"] += stage.gc_ms / 1000
            step["shuffle_write_mib"] += stage.shuffle_write_bytes / (1024 * 1024)
        for task in job.python_tasks:
            for operation, (count, seconds) in task["calls"].items():
                step["aws_calls"][operation][0] += count
                step["aws_calls"][operation][1] += seconds

    summaries = []
    for step in steps.values():
        step["aws_calls"] = {
            operation: {"calls": count, "thread_seconds": round(seconds, 3)}
            for operation, (count, seconds) in sorted(step["aws_calls"].items())
        }
        for name in (
            "seconds",
            "python_busy_seconds",
            "python_task_seconds",
            "jvm_executor_cpu_seconds",
            "jvm_gc_seconds",
            "shuffle_write_mib",
        ):
            step[name] = round(step[name], 3)
        summaries.append(step)
    return summaries


def summarise_waves(jobs: list[JobTimes]) -> list[dict[str, Any]]:
    """Group jobs into waves, each starting at its first receive job, with each step's seconds.

    ``driver_seconds_between_jobs`` is the part of the wave in which no
    Spark job ran: planning, persisting and the driver's own calls.
    """
    waves: list[dict[str, Any]] = []
    previous = None
    for job in jobs:
        starts_wave = job.label == RECEIVE and previous != RECEIVE
        previous = job.label
        if starts_wave or not waves:
            waves.append({"first_ms": job.submitted_ms, "last_ms": job.completed_ms, "steps": {}})
        wave = waves[-1]
        wave["steps"][job.label] = round(wave["steps"].get(job.label, 0.0) + job.seconds, 3)
        if job.completed_ms is not None:
            wave["last_ms"] = max(wave["last_ms"] or 0, job.completed_ms)

    summaries = []
    for number, wave in enumerate(waves, start=1):
        span = ((wave["last_ms"] or wave["first_ms"]) - wave["first_ms"]) / 1000
        in_jobs = sum(wave["steps"].values())
        summaries.append(
            {
                "wave": number,
                "seconds": round(span, 3),
                "steps": wave["steps"],
                "driver_seconds_between_jobs": round(max(0.0, span - in_jobs), 3),
            }
        )
    return summaries


def profile_run(event_log_dir: Path, call_log_dir: Path | None, backfill: bool = False) -> dict[str, Any]:
    """Return the step and wave breakdown of one run."""
    jobs, stages = collect_jobs(read_events(event_log_dir), backfill)
    records = read_task_records(call_log_dir) if call_log_dir is not None else []
    unplaced = attach_tasks(jobs, records)
    return {
        "jobs": len(jobs),
        "python_tasks": len(records),
        "python_tasks_outside_jobs": unplaced,
        "steps": summarise_steps(jobs, stages),
        "waves": summarise_waves(jobs),
        "seconds_in_jobs": round(sum(job.seconds for job in jobs), 3),
        "first_job_ms": jobs[0].submitted_ms if jobs else None,
        "last_job_ms": max((job.completed_ms or 0) for job in jobs) if jobs else None,
    }
