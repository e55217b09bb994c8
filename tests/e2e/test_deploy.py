"""Deploy infra/template.yaml to the local endpoint and check what it created."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from cfnlint.decode import cfn_yaml

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.tooling.deploy import (
    ARTIFACT_PARAMETERS,
    DeployError,
    MissingArtifactError,
    _wait_for_stack,
    deploy_stack,
)
from taxi_pipeline.tooling.packaging import FUNCTION_FOLDERS, JOB_SCRIPT, build_artifacts

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "infra" / "template.yaml"
HANDLER_PATHS = [REPO_ROOT / "lambdas" / folder / "app.py" for folder in FUNCTION_FOLDERS.values()]
TEARDOWN_TIMEOUT_SECONDS = 60.0

STAND_IN_HANDLER = (
    '"""Stand-in handler: the real one is not in this checkout."""\n\n\n'
    "def lambda_handler(event, context):\n"
    '    return {"batchItemFailures": []}\n'
)
STAND_IN_JOB = '"""Stand-in job script: the real one is not in this checkout."""\n'

# Two Glue jobs with one name: the second fails to create, so the stack rolls back.
FAILING_TEMPLATE = """
AWSTemplateFormatVersion: '2010-09-09'
Parameters:
  ArtifactBucket: {Type: String}
  StartFunctionS3Key: {Type: String}
  EndFunctionS3Key: {Type: String}
  JobScriptKey: {Type: String}
  JobLibraryKey: {Type: String}
  JobName: {Type: String}
Resources:
  JobRole:
    Type: AWS::IAM::Role
    Properties:
      AssumeRolePolicyDocument:
        Version: '2012-10-17'
        Statement:
          - Effect: Allow
            Principal: {Service: glue.amazonaws.com}
            Action: sts:AssumeRole
  FirstJob:
    Type: AWS::Glue::Job
    Properties:
      Name: !Ref JobName
      Role: !GetAtt JobRole.Arn
      Command: {Name: glueetl, ScriptLocation: !Sub 's3://${ArtifactBucket}/${JobScriptKey}'}
  SecondJob:
    Type: AWS::Glue::Job
    DependsOn: FirstJob
    Properties:
      Name: !Ref JobName
      Role: !GetAtt JobRole.Arn
      Command: {Name: glueetl, ScriptLocation: !Sub 's3://${ArtifactBucket}/${JobScriptKey}'}
"""


@dataclass(frozen=True)
class DeployedStack:
    """A stack deployed once for this module, with what the tests compare against."""

    name: str
    name_suffix: str
    outputs: dict[str, str]
    settings: AwsSettings
    artifacts_dir: Path
    real_handlers: bool


def build_from_checkout_or_stand_ins(tmp_root: Path) -> tuple[Path, bool]:
    """Build the artifacts, using stand-ins for entry scripts this checkout lacks.

    Returns the build folder and whether both real Lambda handlers were used.
    """
    real_handlers = all(path.is_file() for path in HANDLER_PATHS)
    if real_handlers and (REPO_ROOT / JOB_SCRIPT).is_file():
        return build_artifacts(tmp_root / "build", repo_root=REPO_ROOT)[0].path.parent, True

    source_root = tmp_root / "repo"
    shutil.copytree(
        REPO_ROOT / "lib" / "taxi_pipeline",
        source_root / "lib" / "taxi_pipeline",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for folder in FUNCTION_FOLDERS.values():
        target = source_root / "lambdas" / folder / "app.py"
        target.parent.mkdir(parents=True)
        real = REPO_ROOT / "lambdas" / folder / "app.py"
        target.write_text(real.read_text() if real.is_file() else STAND_IN_HANDLER)
    job_target = source_root / JOB_SCRIPT
    job_target.parent.mkdir(parents=True)
    real_job = REPO_ROOT / JOB_SCRIPT
    job_target.write_text(real_job.read_text() if real_job.is_file() else STAND_IN_JOB)

    build_artifacts(tmp_root / "build", repo_root=source_root)
    return tmp_root / "build", real_handlers


def delete_stack_quietly(settings: AwsSettings, stack_name: str) -> None:
    """Delete a test stack and wait for it, logging instead of failing the tests."""
    cloudformation = settings.client("cloudformation")
    try:
        cloudformation.delete_stack(StackName=stack_name)
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
            if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
                return
            if stacks[0]["StackStatus"] == "DELETE_FAILED":
                logger.warning("deleting test stack %s failed", stack_name)
                return
            time.sleep(1)
        logger.warning("test stack %s was not deleted within the teardown timeout", stack_name)
    except ClientError as exc:
        if "does not exist" not in str(exc):
            logger.warning("deleting test stack %s failed: %s", stack_name, exc)


@pytest.fixture(scope="module")
def deployed(aws_settings, tmp_path_factory) -> Iterator[DeployedStack]:
    settings = aws_settings
    run_id = uuid.uuid4().hex[:8]
    stack_name = f"taxi-pipeline-e2e-{run_id}"
    name_suffix = f"-e2e{run_id}"
    artifacts_dir, real_handlers = build_from_checkout_or_stand_ins(tmp_path_factory.mktemp("deploy"))

    outputs = deploy_stack(
        stack_name,
        TEMPLATE_PATH,
        artifacts_dir,
        None,
        {"NameSuffix": name_suffix, "TableDeletionProtectionEnabled": "false"},
        settings,
        timeout_seconds=300,
        poll_seconds=1,
    )
    yield DeployedStack(stack_name, name_suffix, outputs, settings, artifacts_dir, real_handlers)

    delete_stack_quietly(settings, stack_name)
    # The table has DeletionPolicy Retain, so the stack deletion leaves it behind.
    dynamodb = settings.client("dynamodb")
    try:
        dynamodb.update_table(TableName=outputs["TripTableName"], DeletionProtectionEnabled=False)
        dynamodb.delete_table(TableName=outputs["TripTableName"])
    except ClientError as exc:
        logger.warning("deleting test table %s failed: %s", outputs["TripTableName"], exc)


def test_deploy_missing_artifacts_named(tmp_path):
    settings = AwsSettings(region="us-east-1")
    (tmp_path / "start-taxi-trips.zip").write_bytes(b"zip")

    with pytest.raises(MissingArtifactError, match="end-taxi-trips.zip") as raised:
        deploy_stack("unused", TEMPLATE_PATH, tmp_path, "unused-bucket", {}, settings)

    assert "start-taxi-trips.zip" not in str(raised.value)
    assert "make package" in str(raised.value)


class StuckCloudFormation:
    """CloudFormation stand-in whose stack never leaves CREATE_IN_PROGRESS.

    Its events list one failure of the current operation, then the
    operation's start, then a failure of an earlier operation.
    """

    def describe_stacks(self, StackName):
        return {"Stacks": [{"StackName": StackName, "StackStatus": "CREATE_IN_PROGRESS"}]}

    def describe_stack_events(self, StackName, **_):
        return {
            "StackEvents": [
                {
                    "LogicalResourceId": "ReplayJob",
                    "ResourceType": "AWS::Glue::Job",
                    "ResourceStatus": "CREATE_FAILED",
                    "ResourceStatusReason": "access denied",
                },
                {
                    "LogicalResourceId": StackName,
                    "ResourceType": "AWS::CloudFormation::Stack",
                    "ResourceStatus": "CREATE_IN_PROGRESS",
                },
                {
                    "LogicalResourceId": "EarlierQueue",
                    "ResourceType": "AWS::SQS::Queue",
                    "ResourceStatus": "UPDATE_FAILED",
                },
            ]
        }


def test_wait_timeout_lists_current_failures():
    started = datetime.now(UTC)

    with pytest.raises(DeployError) as raised:
        _wait_for_stack(StuckCloudFormation(), "stuck", started, 0, 0, lambda seconds: None)

    message = str(raised.value)
    assert "did not finish within 0 s (status CREATE_IN_PROGRESS)" in message
    assert "ReplayJob (AWS::Glue::Job): CREATE_FAILED: access denied" in message
    assert "EarlierQueue" not in message


@pytest.mark.endpoint
@pytest.mark.e2e
class TestDeployedStack:
    def test_stack_create_complete(self, deployed):
        cloudformation = deployed.settings.client("cloudformation")

        stack = cloudformation.describe_stacks(StackName=deployed.name)["Stacks"][0]

        assert stack["StackStatus"] == "CREATE_COMPLETE"

    def test_every_template_resource_created(self, deployed):
        template = cfn_yaml.load(str(TEMPLATE_PATH))
        # Conditional resources depend on e-mail parameters, which this deployment leaves empty.
        expected = {
            logical_id
            for logical_id, resource in template["Resources"].items()
            if "Condition" not in resource
        }
        cloudformation = deployed.settings.client("cloudformation")

        paginator = cloudformation.get_paginator("list_stack_resources")
        statuses = {
            summary["LogicalResourceId"]: summary["ResourceStatus"]
            for page in paginator.paginate(StackName=deployed.name)
            for summary in page["StackResourceSummaries"]
        }

        assert set(statuses) == expected
        assert {status for status in statuses.values()} == {"CREATE_COMPLETE"}

    def test_outputs_follow_names(self, deployed):
        suffix = deployed.name_suffix

        assert deployed.outputs["StartTripStreamName"] == f"start-trip-stream{suffix}"
        assert deployed.outputs["EndTripStreamName"] == f"end-trip-stream{suffix}"
        assert deployed.outputs["TripTableName"] == f"taxi_trip_details{suffix}"
        assert deployed.outputs["StartFunctionName"] == f"start-taxi-trips{suffix}"
        assert deployed.outputs["EndFunctionName"] == f"end-taxi-trips{suffix}"
        assert deployed.outputs["ReplayJobName"] == f"replay-failed-trips{suffix}"
        assert deployed.outputs["RetryQueueArn"].endswith(f":failed-updated-trips{suffix}")
        assert deployed.outputs["InvalidTripsTopicArn"].endswith(f":Invalid-taxi-trips{suffix}")

    def test_table_exists(self, deployed):
        dynamodb = deployed.settings.client("dynamodb")

        table = dynamodb.describe_table(TableName=deployed.outputs["TripTableName"])["Table"]

        assert table["KeySchema"] == [{"AttributeName": "trip_id", "KeyType": "HASH"}]
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"

    @pytest.mark.parametrize("output", ["StartTripStreamName", "EndTripStreamName"])
    def test_stream_exists(self, deployed, output):
        kinesis = deployed.settings.client("kinesis")

        summary = kinesis.describe_stream_summary(StreamName=deployed.outputs[output])
        description = summary["StreamDescriptionSummary"]

        assert description["StreamStatus"] == "ACTIVE"
        assert description["StreamModeDetails"] == {"StreamMode": "ON_DEMAND"}

    def test_topic_exists(self, deployed):
        sns = deployed.settings.client("sns")

        attributes = sns.get_topic_attributes(TopicArn=deployed.outputs["InvalidTripsTopicArn"])

        assert attributes["Attributes"]["TopicArn"] == deployed.outputs["InvalidTripsTopicArn"]

    def test_retry_queue_redrives_to_dead_letter_queue(self, deployed):
        sqs = deployed.settings.client("sqs")
        dead_letter_arn = sqs.get_queue_attributes(
            QueueUrl=deployed.outputs["DeadLetterQueueUrl"], AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]

        attributes = sqs.get_queue_attributes(
            QueueUrl=deployed.outputs["RetryQueueUrl"], AttributeNames=["All"]
        )["Attributes"]

        redrive = json.loads(attributes["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"] == dead_letter_arn
        assert int(redrive["maxReceiveCount"]) == 5
        assert attributes["VisibilityTimeout"] == "900"
        assert attributes["MessageRetentionPeriod"] == "1209600"

    def test_stream_records_failed_queue_exists(self, deployed):
        sqs = deployed.settings.client("sqs")

        attributes = sqs.get_queue_attributes(
            QueueUrl=deployed.outputs["StreamRecordsFailedQueueUrl"],
            AttributeNames=["MessageRetentionPeriod"],
        )["Attributes"]

        assert attributes["MessageRetentionPeriod"] == "1209600"

    @pytest.mark.parametrize("output", ["StartFunctionName", "EndFunctionName"])
    def test_function_configuration(self, deployed, output):
        lambda_client = deployed.settings.client("lambda")

        configuration = lambda_client.get_function_configuration(FunctionName=deployed.outputs[output])

        variables = configuration["Environment"]["Variables"]
        assert configuration["Runtime"] == "python3.11"
        assert configuration["Handler"] == "app.lambda_handler"
        assert variables["TABLE_NAME"] == deployed.outputs["TripTableName"]
        assert variables["INVALID_TOPIC_ARN"] == deployed.outputs["InvalidTripsTopicArn"]
        assert variables["RETRY_QUEUE_URL"] == deployed.outputs["RetryQueueUrl"]
        assert variables["AWS_RETRY_MODE"] == "standard"
        assert variables["AWS_MAX_ATTEMPTS"] == "3"

    @pytest.mark.parametrize(
        ("function_output", "stream_output"),
        [("StartFunctionName", "StartTripStreamName"), ("EndFunctionName", "EndTripStreamName")],
    )
    def test_event_source_mapping(self, deployed, function_output, stream_output):
        lambda_client = deployed.settings.client("lambda")
        kinesis = deployed.settings.client("kinesis")
        sqs = deployed.settings.client("sqs")
        stream_arn = kinesis.describe_stream_summary(StreamName=deployed.outputs[stream_output])[
            "StreamDescriptionSummary"
        ]["StreamARN"]
        failed_queue_arn = sqs.get_queue_attributes(
            QueueUrl=deployed.outputs["StreamRecordsFailedQueueUrl"], AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]

        mappings = lambda_client.list_event_source_mappings(FunctionName=deployed.outputs[function_output])[
            "EventSourceMappings"
        ]

        assert len(mappings) == 1
        mapping = mappings[0]
        assert mapping["EventSourceArn"] == stream_arn
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert mapping["BisectBatchOnFunctionError"] is True
        assert mapping["StartingPosition"] == "TRIM_HORIZON"
        assert mapping["DestinationConfig"]["OnFailure"]["Destination"] == failed_queue_arn

    def test_replay_job(self, deployed):
        glue = deployed.settings.client("glue")

        job = glue.get_job(JobName=deployed.outputs["ReplayJobName"])["Job"]

        arguments = job["DefaultArguments"]
        assert job["GlueVersion"] == "5.0"
        assert job["Command"]["Name"] == "glueetl"
        assert job["Command"]["ScriptLocation"].endswith("/replay_failed_trips.py")
        assert arguments["--queue_url"] == deployed.outputs["RetryQueueUrl"]
        assert arguments["--table_name"] == deployed.outputs["TripTableName"]
        assert arguments["--dead_letter_queue_url"] == deployed.outputs["DeadLetterQueueUrl"]
        assert arguments["--extra-py-files"].endswith("/taxi_pipeline.zip")

    def test_replay_trigger(self, deployed):
        glue = deployed.settings.client("glue")

        trigger = glue.get_trigger(Name=deployed.outputs["ReplayTriggerName"])["Trigger"]

        assert trigger["Type"] == "SCHEDULED"
        assert trigger["Schedule"] == "cron(0/15 * * * ? *)"
        assert trigger["State"] == "ACTIVATED"
        assert trigger["Actions"] == [{"JobName": deployed.outputs["ReplayJobName"]}]

    def test_alarms_exist(self, deployed):
        cloudwatch = deployed.settings.client("cloudwatch")
        suffix = deployed.name_suffix
        expected = {
            f"failed-updated-trips-dlq{suffix}-not-empty",
            f"stream-records-failed-dlq{suffix}-not-empty",
            f"failed-updated-trips{suffix}-oldest-message-age",
            f"start-taxi-trips{suffix}-errors",
            f"end-taxi-trips{suffix}-errors",
            f"start-trip-stream{suffix}-iterator-age",
            f"end-trip-stream{suffix}-iterator-age",
        }

        alarms = cloudwatch.describe_alarms(AlarmNames=sorted(expected))["MetricAlarms"]

        assert {alarm["AlarmName"] for alarm in alarms} == expected

    def test_log_groups_exist(self, deployed):
        logs = deployed.settings.client("logs")

        groups = logs.describe_log_groups(logGroupNamePrefix="/aws/lambda/")["logGroups"]

        names = {group["logGroupName"] for group in groups}
        assert f"/aws/lambda/{deployed.outputs['StartFunctionName']}" in names
        assert f"/aws/lambda/{deployed.outputs['EndFunctionName']}" in names

    def test_artifacts_under_content_hash(self, deployed):
        glue = deployed.settings.client("glue")
        job = glue.get_job(JobName=deployed.outputs["ReplayJobName"])["Job"]
        script_location = job["Command"]["ScriptLocation"]
        script = deployed.artifacts_dir / "replay_failed_trips.py"

        digest = hashlib.sha256(script.read_bytes()).hexdigest()

        assert script_location.endswith(f"/artifacts/{digest}/replay_failed_trips.py")

    def test_redeploy_unchanged_keeps_stack(self, deployed):
        cloudformation = deployed.settings.client("cloudformation")

        outputs = deploy_stack(
            deployed.name,
            TEMPLATE_PATH,
            deployed.artifacts_dir,
            None,
            {},
            deployed.settings,
            timeout_seconds=300,
            poll_seconds=1,
        )

        stack = cloudformation.describe_stacks(StackName=deployed.name)["Stacks"][0]
        assert outputs == deployed.outputs
        assert stack["StackStatus"] == "CREATE_COMPLETE"

    @pytest.mark.parametrize("output", ["StartFunctionName", "EndFunctionName"])
    def test_function_empty_batch(self, deployed, output):
        if not deployed.real_handlers:
            pytest.skip("lambdas/*/app.py are not in this checkout; the stand-in handlers prove nothing")
        lambda_client = deployed.settings.client("lambda")

        response = lambda_client.invoke(
            FunctionName=deployed.outputs[output], Payload=json.dumps({"Records": []})
        )

        payload = json.loads(response["Payload"].read())
        assert response.get("FunctionError") is None, payload
        assert payload == {"batchItemFailures": []}


@pytest.mark.endpoint
@pytest.mark.e2e
def test_failed_stack_lists_resources(aws_settings, tmp_path):
    settings = aws_settings
    run_id = uuid.uuid4().hex[:8]
    stack_name = f"tp-e2e-failing-{run_id}"
    template_path = tmp_path / "failing.yaml"
    template_path.write_text(FAILING_TEMPLATE)
    for file_name in ARTIFACT_PARAMETERS:
        (tmp_path / file_name).write_bytes(file_name.encode())

    try:
        with pytest.raises(DeployError) as raised:
            deploy_stack(
                stack_name,
                template_path,
                tmp_path,
                None,
                {"JobName": f"e2e-duplicate-job-{run_id}"},
                settings,
                timeout_seconds=120,
                poll_seconds=1,
            )
    finally:
        delete_stack_quietly(settings, stack_name)

    message = str(raised.value)
    assert "ROLLBACK_COMPLETE" in message
    assert "SecondJob (AWS::Glue::Job): CREATE_FAILED" in message
