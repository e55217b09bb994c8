"""AWS Glue 5.0 job: replay failed trip updates from SQS into DynamoDB, or backfill from files.

Required arguments: ``--JOB_NAME``, ``--queue_url``, ``--table_name``. With
``--source`` the job backfills from files instead of draining the queue. The
optional arguments are listed in ``taxi_pipeline.replay.arguments.OPTIONAL``.
Locally: ``python jobs/replay_failed_trips.py --JOB_NAME replay --queue_url URL --table_name T``.
"""

from __future__ import annotations

import logging
import sys

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.replay import run_backfill, run_replay
from taxi_pipeline.replay.arguments import backfill_options, replay_options, resolve_arguments
from taxi_pipeline.replay.session import glue_or_spark


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    arguments = resolve_arguments(argv)
    settings = AwsSettings.from_env(
        region=arguments.get("region"), endpoint_url=arguments.get("endpoint_url")
    )
    spark, job = glue_or_spark(arguments["JOB_NAME"], arguments)

    if arguments.get("source"):
        report = run_backfill(spark, backfill_options(arguments), settings)
        complete = report.stop_reason == "source applied"
    else:
        report = run_replay(spark, replay_options(arguments), settings)
        complete = True
    print(report.render_text())

    if job is not None:
        job.commit()
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
