"""The run report: what one replay or backfill run did, as counts.

Message outcomes of a replay run, each message counted once:

* ``applied``: its event changed the trip item.
* ``duplicate``: its event was already in the table (same revision), or it
  repeated another message of the same wave.
* ``stale``: a newer event of the same trip and kind was already in.
* ``dead_lettered``: invalid (a poison message) or rejected by DynamoDB for
  good; copied to the dead-letter queue with its reason, then deleted.
* ``retry_later``: a retryable write failure, or a dead-letter copy that
  failed; left on the queue for a later run.
* ``would_apply``: a dry run's valid messages, nothing written.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from taxi_pipeline.aws import AwsSettings

logger = logging.getLogger(__name__)

OUTCOMES = ("applied", "duplicate", "stale", "dead_lettered", "retry_later", "would_apply")
MAX_SAMPLES = 20


@dataclass
class RunReport:
    """Counts of one run, built up wave by wave."""

    mode: str
    job_name: str = "replay-failed-trips"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    waves: int = 0
    stop_reason: str = ""
    counts: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, partial: dict[str, Any]) -> None:
        """Merge the counts one Spark task returned."""
        self.counts.update(partial.get("counts", {}))
        self.outcomes.update(partial.get("outcomes", {}))
        self.reasons.update(partial.get("reasons", {}))
        room = MAX_SAMPLES - len(self.samples)
        if room > 0:
            self.samples.extend(partial.get("samples", [])[:room])

    def finish(self, stop_reason: str) -> RunReport:
        self.stop_reason = stop_reason
        self.finished_at = time.time()
        return self

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at or time.time()) - self.started_at

    @property
    def messages_per_second(self) -> float:
        handled = self.counts.get("messages_received", 0) or self.counts.get("rows_read", 0)
        return handled / self.duration_seconds if self.duration_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-ready data."""
        return {
            "mode": self.mode,
            "job_name": self.job_name,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "finished_at": datetime.fromtimestamp(self.finished_at, UTC).isoformat()
            if self.finished_at
            else None,
            "duration_seconds": round(self.duration_seconds, 3),
            "messages_per_second": round(self.messages_per_second, 1),
            "waves": self.waves,
            "stop_reason": self.stop_reason,
            "outcomes": {name: self.outcomes.get(name, 0) for name in OUTCOMES if name in self.outcomes}
            | {name: count for name, count in sorted(self.outcomes.items()) if name not in OUTCOMES},
            "reasons": dict(sorted(self.reasons.items())),
            "counts": dict(sorted(self.counts.items())),
            "samples": self.samples,
        }

    def render_text(self) -> str:
        """Return a short human-readable summary, one fact per line."""
        data = self.to_dict()
        progress = "" if self.mode == "backfill" else f" after {data['waves']} wave(s)"
        lines = [
            f"{self.mode} run: {data['stop_reason']}{progress} "
            f"in {data['duration_seconds']:.1f} s ({data['messages_per_second']:.1f} per second)",
        ]
        lines += [f"  {name:<30}{count:>10}" for name, count in data["outcomes"].items()]
        if data["reasons"]:
            lines.append("  reasons:")
            lines += [f"    {name:<28}{count:>10}" for name, count in data["reasons"].items()]
        lines.append("  counts:")
        lines += [f"    {name:<28}{count:>10}" for name, count in data["counts"].items()]
        return "\n".join(lines)

    def log(self) -> None:
        """Log the report as one structured line."""
        logger.info("run report %s", json.dumps(self.to_dict(), separators=(",", ":")))


def write_report(report: RunReport, path: str, settings: AwsSettings | None = None) -> str:
    """Write the report as JSON to a local path or an ``s3://bucket/key`` URI; return where."""
    body = json.dumps(report.to_dict(), indent=2).encode("utf-8")
    if path.startswith("s3://"):
        bucket, _, key = path[len("s3://") :].partition("/")
        if not bucket or not key:
            raise ValueError(f"report path {path!r} is invalid: expected s3://bucket/key")
        (settings or AwsSettings.from_env()).client("s3").put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/json"
        )
        return path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    return str(target)


def publish_metrics(report: RunReport, namespace: str, settings: AwsSettings | None = None) -> bool:
    """Send the outcome counts as CloudWatch metrics; log and return False where that fails.

    A run whose work is done must not fail because metrics could not be sent.
    """
    dimensions = [
        {"Name": "JobName", "Value": report.job_name},
        {"Name": "Mode", "Value": report.mode},
    ]
    metrics = [
        {
            "MetricName": f"Messages_{name}",
            "Value": float(count),
            "Unit": "Count",
            "Dimensions": dimensions,
        }
        for name, count in report.outcomes.items()
    ]
    metrics.append(
        {
            "MetricName": "DurationSeconds",
            "Value": report.duration_seconds,
            "Unit": "Seconds",
            "Dimensions": dimensions,
        }
    )
    metrics.append(
        {
            "MetricName": "MessagesPerSecond",
            "Value": report.messages_per_second,
            "Unit": "Count/Second",
            "Dimensions": dimensions,
        }
    )
    try:
        client = (settings or AwsSettings.from_env()).client("cloudwatch")
        for start in range(0, len(metrics), 20):
            client.put_metric_data(Namespace=namespace, MetricData=metrics[start : start + 20])
    except (ClientError, BotoCoreError) as exc:
        logger.warning("sending metrics to CloudWatch namespace %s failed: %s", namespace, exc)
        return False
    return True
