"""Taxi-trip pipeline: trip events, idempotent trip writes and the replay job.

The modules at this level need only the standard library, boto3 and tzdata,
so the same code ships to AWS Lambda and AWS Glue. ``taxi_pipeline.replay``
adds PySpark; ``taxi_pipeline.tooling`` is local tooling and never ships.
"""

from __future__ import annotations

__version__ = "0.1.0"
