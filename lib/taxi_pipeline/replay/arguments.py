"""Glue job arguments: the required ones through ``getResolvedOptions``, the rest optional.

``getResolvedOptions`` treats every name it is given as required, so the
optional arguments are read here, and leaving any of them out never fails
the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taxi_pipeline.replay.options import BackfillOptions, ReplayOptions

REQUIRED = ("JOB_NAME", "queue_url", "table_name")
# Each optional argument, the type it is read as, and what it sets.
OPTIONAL: dict[str, tuple[type, str]] = {
    "dead_letter_queue_url": (str, "dead-letter queue; default: the retry queue's redrive target"),
    "max_messages": (int, "stop after receiving this many messages"),
    "max_runtime_seconds": (float, "stop starting waves after this many seconds"),
    "wave_size": (int, "messages received per wave"),
    "parallelism": (int, "Spark tasks per wave; default: the cluster's default parallelism"),
    "receive_threads": (int, "concurrent long polls per receive task"),
    "write_threads": (int, "concurrent trip writes per write task"),
    "wait_time_seconds": (int, "long-poll wait of each receive, 0 to 20"),
    "visibility_timeout": (int, "seconds a received message stays hidden, extended for long waves"),
    "retry_delay_seconds": (int, "seconds a message whose write failed stays hidden"),
    "dry_run": (bool, "receive and report, write and delete nothing"),
    "dry_run_visibility_timeout": (int, "visibility timeout of a dry run's receives"),
    "report_path": (str, "write the run report as JSON to this local path or s3:// URI"),
    "metrics_namespace": (str, "send outcome counts as CloudWatch metrics to this namespace"),
    "source": (
        str,
        "backfill from these files (local path or s3:// URI) instead of draining the queue",
    ),
    "source_format": (str, "auto, parquet, json (JSON Lines) or csv"),
    "rejects_path": (str, "backfill: write invalid rows as JSON Lines here"),
    "region": (str, "AWS region; default: the environment's"),
    "endpoint_url": (str, "AWS endpoint, for a local emulator; default: the SDK's"),
}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


def read_optional(argv: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """Return the values of the named ``--name value`` or ``--name=value`` arguments that are present."""
    found: dict[str, str] = {}
    index = 0
    while index < len(argv):
        item = argv[index]
        index += 1
        if not item.startswith("--"):
            continue
        name, has_value, value = item[2:].partition("=")
        if name not in names:
            continue
        if not has_value:
            if index < len(argv) and not argv[index].startswith("--"):
                value = argv[index]
                index += 1
            else:
                value = "true"
        found[name] = value
    return found


def convert(name: str, text: str) -> Any:
    """Convert one optional argument's text to its type, naming the argument on failure."""
    kind = OPTIONAL[name][0]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"--{name} must be true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError as exc:
            raise ValueError(f"--{name} must be a {kind.__name__}, got {text!r}") from exc
    return text


def resolve_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """Read the required arguments with Glue's ``getResolvedOptions`` and the optional ones here."""
    from awsglue.utils import getResolvedOptions

    arguments: dict[str, Any] = dict(getResolvedOptions(list(argv), list(REQUIRED)))
    for name, text in read_optional(argv, list(OPTIONAL)).items():
        arguments[name] = convert(name, text)
    return arguments


def replay_options(arguments: dict[str, Any]) -> ReplayOptions:
    """Build the drain settings from resolved arguments; defaults fill what is absent."""
    names = set(ReplayOptions.__dataclass_fields__) - {"queue_url", "table_name", "job_name"}
    return ReplayOptions(
        queue_url=arguments["queue_url"],
        table_name=arguments["table_name"],
        job_name=arguments.get("JOB_NAME", "replay-failed-trips"),
        **{name: arguments[name] for name in names if name in arguments},
    )


def backfill_options(arguments: dict[str, Any]) -> BackfillOptions:
    """Build the backfill settings from resolved arguments; defaults fill what is absent."""
    names = set(BackfillOptions.__dataclass_fields__) - {"source", "table_name", "job_name"}
    return BackfillOptions(
        source=arguments["source"],
        table_name=arguments["table_name"],
        job_name=arguments.get("JOB_NAME", "replay-failed-trips"),
        **{name: arguments[name] for name in names if name in arguments},
    )
