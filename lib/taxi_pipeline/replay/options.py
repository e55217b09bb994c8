"""Settings of a replay or backfill run, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SOURCE_FORMATS = ("auto", "parquet", "json", "csv")


def _check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ReplayOptions:
    """Settings of a queue drain.

    ``visibility_timeout`` must exceed the time one wave takes; waves that
    run long extend it, see ``VisibilityKeeper``. ``retry_delay_seconds`` is
    how long a message whose write failed stays hidden, so a run never
    retries it in a hot loop.
    """

    queue_url: str
    table_name: str
    dead_letter_queue_url: str | None = None
    job_name: str = "replay-failed-trips"
    max_messages: int | None = None
    max_runtime_seconds: float = 3300.0
    wave_size: int | None = None  # None: 2,500 per task, from 10,000 to 100,000
    parallelism: int | None = None
    receive_threads: int = 8
    write_threads: int = 16
    wait_time_seconds: int = 10
    visibility_timeout: int = 900
    retry_delay_seconds: int = 300
    max_empty_waves: int = 3
    dry_run: bool = False
    dry_run_visibility_timeout: int = 60
    report_path: str | None = None
    metrics_namespace: str | None = None

    def __post_init__(self) -> None:
        if not self.queue_url:
            raise ValueError("queue_url is empty: pass the URL of the retry queue (--queue_url)")
        if not self.table_name:
            raise ValueError("table_name is empty: pass the trip table (--table_name)")
        for name in ("max_messages", "parallelism", "wave_size"):
            _check_positive(name, getattr(self, name))
        for name in (
            "max_runtime_seconds",
            "receive_threads",
            "write_threads",
            "max_empty_waves",
        ):
            _check_positive(name, getattr(self, name), allow_none=False)
        if not 0 <= self.wait_time_seconds <= 20:
            raise ValueError(
                f"wait_time_seconds must be from 0 to 20 (the SQS maximum), got {self.wait_time_seconds}"
            )
        # A receive phase lasts at least one long poll, so a message must stay
        # hidden for longer than that with room to spare, or the same wave
        # receives it again and its first receipt handle stops working.
        for name in ("visibility_timeout", "dry_run_visibility_timeout"):
            value = getattr(self, name)
            if value <= 2 * self.wait_time_seconds:
                raise ValueError(
                    f"{name} ({value} s) must be longer than twice wait_time_seconds "
                    f"({self.wait_time_seconds} s)"
                )
        for name in ("visibility_timeout", "dry_run_visibility_timeout", "retry_delay_seconds"):
            value = getattr(self, name)
            if not 1 <= value <= 43_200:
                raise ValueError(
                    f"{name} must be from 1 to 43200 seconds (12 hours, the SQS maximum), got {value}"
                )


@dataclass(frozen=True)
class BackfillOptions:
    """Settings of a backfill from files of start and end events."""

    source: str
    table_name: str
    source_format: str = "auto"
    job_name: str = "replay-failed-trips"
    parallelism: int | None = None
    write_threads: int = 16
    report_path: str | None = None
    rejects_path: str | None = None
    metrics_namespace: str | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is empty: pass a folder, file or s3:// prefix of event files (--source)")
        if not self.table_name:
            raise ValueError("table_name is empty: pass the trip table (--table_name)")
        if self.source_format not in SOURCE_FORMATS:
            raise ValueError(
                f"source_format {self.source_format!r} is invalid: use one of {', '.join(SOURCE_FORMATS)}"
            )
        _check_positive("parallelism", self.parallelism)
        _check_positive("write_threads", self.write_threads, allow_none=False)


def option_types(options_class: type) -> dict[str, Any]:
    """Return each option's name and annotated type, for argument parsing."""
    return {item.name: item.type for item in fields(options_class)}
