"""Spark sessions for the replay job: Glue's where its JVM classes exist, plain Spark elsewhere."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)


def local_spark(app_name: str = "replay-failed-trips", cores: int | str = "*") -> SparkSession:
    """Return a local SparkSession whose Python workers use this interpreter.

    Without ``PYSPARK_PYTHON``, Spark starts workers with whatever
    ``python3`` is first on PATH, which may lack this package.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Keep a local run on loopback rather than the host's network address.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return (
        SparkSession.builder.master(f"local[{cores}]")
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )


def glue_or_spark(job_name: str, arguments: dict[str, Any]) -> tuple[SparkSession, Any]:
    """Start the job on a GlueContext and ``Job.init`` if Glue's JVM classes exist, else on plain Spark.

    Returns the SparkSession and the Glue ``Job`` to commit, or ``None``.
    """
    try:
        from awsglue.context import GlueContext
        from awsglue.job import Job
        from pyspark.context import SparkContext

        glue_context = GlueContext(SparkContext.getOrCreate())
        job = Job(glue_context)
        job.init(job_name, arguments)
    except Exception as exc:  # noqa: BLE001 - py4j raises plain TypeError or Py4JError when the jars are absent
        logger.info("Glue's JVM classes are not available (%s): running on a local SparkSession", exc)
        # The context made for the attempt may run workers on the wrong
        # interpreter, so it is replaced by a local session set up for this one.
        active = SparkContext._active_spark_context
        if active is not None:
            active.stop()
        return local_spark(job_name), None
    return glue_context.spark_session, job
