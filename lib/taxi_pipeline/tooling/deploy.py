"""Deploy the pipeline stack: upload the artifacts, then create or update the stack.

The same code deploys to the local endpoint (``AWS_ENDPOINT_URL``) and to AWS:
every client comes from an ``AwsSettings`` value, whose ``endpoint_url`` of
``None`` lets the SDK resolve the endpoint from the environment.

Artifacts are uploaded under a prefix made of their SHA-256 digest
(``artifacts/<sha256>/<file name>``), so an unchanged file keeps its key, and
CloudFormation leaves the function or job that uses it alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from taxi_pipeline.aws import AwsSettings

logger = logging.getLogger(__name__)

# Artifact file name in the build folder -> template parameter that takes its S3 key.
ARTIFACT_PARAMETERS: dict[str, str] = {
    "start-taxi-trips.zip": "StartFunctionS3Key",
    "end-taxi-trips.zip": "EndFunctionS3Key",
    "replay_failed_trips.py": "JobScriptKey",
    "taxi_pipeline.zip": "JobLibraryKey",
}
BUCKET_PARAMETER = "ArtifactBucket"
ARTIFACT_PREFIX = "artifacts"
TEMPLATE_PREFIX = "templates"

# CreateStack and UpdateStack reject a TemplateBody larger than 51,200 bytes,
# so a larger template is passed as an S3 URL.
TEMPLATE_BODY_MAX_BYTES = 51_200
CAPABILITIES = ("CAPABILITY_IAM", "CAPABILITY_NAMED_IAM")
SUCCESS_STATUSES = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE"})
NO_UPDATES_MESSAGE = "No updates are to be performed"
MAX_EVENT_PAGES = 20
# Margin for the difference between this machine's clock and the event timestamps.
CLOCK_SKEW = timedelta(minutes=5)


class DeployError(RuntimeError):
    """A deployment step failed; the message names the stack or bucket and what to do."""


class MissingArtifactError(DeployError):
    """An artifact file that the template needs is not in the build folder."""


def deploy_stack(
    stack_name: str,
    template_path: str | os.PathLike[str],
    artifacts_dir: str | os.PathLike[str],
    bucket: str | None,
    parameters: Mapping[str, Any],
    settings: AwsSettings,
    *,
    timeout_seconds: float = 1800.0,
    poll_seconds: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Upload the artifacts, create or update ``stack_name`` and return its outputs.

    ``bucket`` ``None`` uses ``<stack_name>-artifacts-<account>-<region>``
    and creates it when missing. A named bucket must exist on AWS, but on a
    local endpoint it is created when missing. ``parameters`` override template
    parameters. On an update, the stack's current value is kept for every
    template parameter that ``parameters`` does not set, as
    ``aws cloudformation deploy`` does. The artifact parameters are always set.

    Raises ``MissingArtifactError`` when the build folder lacks an artifact.
    Raises ``DeployError`` when the stack operation fails or does not finish
    within ``timeout_seconds``, with the failed resource events in its message.
    """
    s3 = settings.client("s3")
    cloudformation = settings.client("cloudformation")

    artifact_files = _find_artifacts(Path(artifacts_dir))
    bucket_name = ensure_bucket(s3, bucket, settings, stack_name)
    template = _template_argument(s3, bucket_name, Path(template_path))
    template_parameters = _template_parameter_keys(cloudformation, template)

    stack_parameters = {str(key): _parameter_value(value) for key, value in parameters.items()}
    unknown = sorted(set(stack_parameters) - template_parameters)
    if unknown:
        raise ValueError(
            f"parameters {', '.join(unknown)} are not in template {template_path}. "
            f"Valid names: {', '.join(sorted(template_parameters))}"
        )

    artifact_keys = upload_artifacts(s3, bucket_name, artifact_files)
    stack_parameters[BUCKET_PARAMETER] = bucket_name
    for file_name, key in artifact_keys.items():
        stack_parameters[ARTIFACT_PARAMETERS[file_name]] = key

    stack = _describe_stack(cloudformation, stack_name)
    started = datetime.now().astimezone()
    if stack is None:
        _create_stack(cloudformation, stack_name, template, stack_parameters)
    else:
        _check_updatable(stack)
        current = {entry["ParameterKey"] for entry in stack.get("Parameters", [])}
        previous_keys = sorted((current & template_parameters) - set(stack_parameters))
        if not _update_stack(cloudformation, stack_name, template, stack_parameters, previous_keys):
            logger.info("stack %s is up to date", stack_name)
            return _outputs(stack)

    final = _wait_for_stack(cloudformation, stack_name, started, timeout_seconds, poll_seconds, sleep)
    return _outputs(final)


def ensure_bucket(s3: Any, bucket: str | None, settings: AwsSettings, stack_name: str) -> str:
    """Return the artifact bucket's name, creating the bucket where that is allowed."""
    if bucket is None:
        name = _default_bucket_name(settings, stack_name, s3.meta.region_name)
        create_missing = True
    else:
        name = bucket
        create_missing = _uses_custom_endpoint(settings)

    try:
        s3.head_bucket(Bucket=name)
        return name
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise DeployError(
                f"bucket {name} cannot be used ({code}): it belongs to another account "
                "or access is denied; pass another --bucket"
            ) from exc

    if not create_missing:
        raise DeployError(
            f"bucket {name} does not exist: create it, or omit the bucket to let the "
            f"deployment create {_default_bucket_name(settings, stack_name, s3.meta.region_name)}"
        )
    _create_bucket(s3, name)
    return name


def upload_artifacts(s3: Any, bucket: str, artifact_files: Mapping[str, Path]) -> dict[str, str]:
    """Upload each artifact under its content-hash prefix and return file name -> key.

    An object that already exists under its key is not uploaded again: the
    key contains the SHA-256 digest of the bytes, so the object is the same.
    """
    keys: dict[str, str] = {}
    for file_name, path in sorted(artifact_files.items()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        key = f"{ARTIFACT_PREFIX}/{digest}/{file_name}"
        keys[file_name] = key

        if _object_exists(s3, bucket, key):
            logger.info("s3://%s/%s is already uploaded", bucket, key)
            continue
        s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest})
        logger.info("uploaded %s to s3://%s/%s (%d bytes)", path, bucket, key, len(data))
    return keys


def _find_artifacts(artifacts_dir: Path) -> dict[str, Path]:
    files = {name: artifacts_dir / name for name in ARTIFACT_PARAMETERS}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise MissingArtifactError(
            f"missing artifacts {', '.join(missing)}: build them first with `make package`"
        )
    return files


def _uses_custom_endpoint(settings: AwsSettings) -> bool:
    """Tell whether clients go to an endpoint set by configuration, such as the local one."""
    return bool(
        settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    )


def _default_bucket_name(settings: AwsSettings, stack_name: str, region: str | None) -> str:
    account = settings.client("sts").get_caller_identity()["Account"]
    name = f"{stack_name}-artifacts-{account}-{region or 'us-east-1'}".lower()
    if len(name) > 63:
        raise ValueError(
            f"default bucket name {name} is longer than the 63 characters S3 allows: pass a bucket name"
        )
    return name


def _create_bucket(s3: Any, name: str) -> None:
    """Create a private bucket in the client's Region."""
    region = s3.meta.region_name
    request: dict[str, Any] = {"Bucket": name}
    # us-east-1 rejects an explicit LocationConstraint.
    if region and region != "us-east-1":
        request["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**request)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code != "BucketAlreadyOwnedByYou":
            raise DeployError(f"creating bucket {name} failed: {exc}") from exc
    s3.put_public_access_block(
        Bucket=name,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    logger.info("created bucket %s", name)


def _object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code", "") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def _template_argument(s3: Any, bucket: str, template_path: Path) -> dict[str, str]:
    """Return ``TemplateBody``, or ``TemplateURL`` for a template over the body limit."""
    try:
        body = template_path.read_bytes()
    except FileNotFoundError as exc:
        raise DeployError(f"template {template_path} not found") from exc
    if len(body) <= TEMPLATE_BODY_MAX_BYTES:
        return {"TemplateBody": body.decode("utf-8")}

    digest = hashlib.sha256(body).hexdigest()
    key = f"{TEMPLATE_PREFIX}/{digest}/{template_path.name}"
    if not _object_exists(s3, bucket, key):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    # Path-style URL on the client's own S3 endpoint, so the same form works
    # for AWS and for the local endpoint.
    url = f"{s3.meta.endpoint_url.rstrip('/')}/{bucket}/{quote(key)}"
    return {"TemplateURL": url}


def _template_parameter_keys(cloudformation: Any, template: Mapping[str, str]) -> set[str]:
    try:
        response = cloudformation.validate_template(**template)
    except ClientError as exc:
        raise DeployError(f"template is invalid: {exc}") from exc
    return {entry["ParameterKey"] for entry in response.get("Parameters", [])}


def _parameter_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe_stack(cloudformation: Any, stack_name: str) -> dict[str, Any] | None:
    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", "")
        if "does not exist" in message:
            return None
        raise
    if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
        return None
    return stacks[0]


def _check_updatable(stack: Mapping[str, Any]) -> None:
    name = stack["StackName"]
    status = stack["StackStatus"]
    if status == "ROLLBACK_COMPLETE":
        raise DeployError(
            f"stack {name} is in ROLLBACK_COMPLETE after a failed create and cannot be updated. "
            f"Delete it (aws cloudformation delete-stack --stack-name {name}) and deploy again"
        )
    if status.endswith("_IN_PROGRESS"):
        raise DeployError(f"stack {name} is busy ({status}): wait until the running operation ends and retry")


def _stack_parameters(values: Mapping[str, str], previous_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [
        {"ParameterKey": key, "ParameterValue": value} for key, value in sorted(values.items())
    ]
    entries.extend({"ParameterKey": key, "UsePreviousValue": True} for key in previous_keys)
    return entries


def _create_stack(
    cloudformation: Any, stack_name: str, template: Mapping[str, str], values: Mapping[str, str]
) -> None:
    logger.info("creating stack %s", stack_name)
    try:
        cloudformation.create_stack(
            StackName=stack_name,
            Parameters=_stack_parameters(values),
            Capabilities=list(CAPABILITIES),
            **template,
        )
    except ClientError as exc:
        raise DeployError(f"creating stack {stack_name} failed: {exc}") from exc


def _update_stack(
    cloudformation: Any,
    stack_name: str,
    template: Mapping[str, str],
    values: Mapping[str, str],
    previous_keys: Sequence[str],
) -> bool:
    """Start an update and return ``False`` when CloudFormation finds nothing to change."""
    logger.info("updating stack %s", stack_name)
    try:
        cloudformation.update_stack(
            StackName=stack_name,
            Parameters=_stack_parameters(values, previous_keys),
            Capabilities=list(CAPABILITIES),
            **template,
        )
    except ClientError as exc:
        if NO_UPDATES_MESSAGE in exc.response.get("Error", {}).get("Message", ""):
            return False
        raise DeployError(f"updating stack {stack_name} failed: {exc}") from exc
    return True


def _wait_for_stack(
    cloudformation: Any,
    stack_name: str,
    started: datetime,
    timeout_seconds: float,
    poll_seconds: float,
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    """Poll the stack until its operation ends, and raise ``DeployError`` unless it succeeded."""
    deadline = time.monotonic() + timeout_seconds
    status = "unknown"
    while True:
        stack = _describe_stack(cloudformation, stack_name)
        if stack is None:
            raise DeployError(
                f"stack {stack_name} disappeared while deploying: "
                + _failure_summary(cloudformation, stack_name, started)
            )
        status = stack["StackStatus"]
        if not status.endswith("_IN_PROGRESS"):
            break
        if time.monotonic() >= deadline:
            raise DeployError(
                f"stack {stack_name} did not finish within {timeout_seconds:.0f} s "
                f"(status {status}); check it in the CloudFormation console. "
                + _failure_summary(cloudformation, stack_name, started)
            )
        sleep(poll_seconds)

    if status not in SUCCESS_STATUSES:
        reason = stack.get("StackStatusReason")
        raise DeployError(
            f"stack {stack_name} ended in {status}"
            + (f" ({reason})" if reason else "")
            + ". "
            + _failure_summary(cloudformation, stack_name, started)
        )
    logger.info("stack %s is %s", stack_name, status)
    return stack


def _failure_summary(cloudformation: Any, stack_name: str, started: datetime) -> str:
    """List the failed resource events of the operation that began at ``started``."""
    failures = [
        f"{event['LogicalResourceId']} ({event.get('ResourceType', '?')}): "
        f"{event['ResourceStatus']}: {event.get('ResourceStatusReason', 'no reason given')}"
        for event in _events_since(cloudformation, stack_name, started)
        if event.get("ResourceStatus", "").endswith("FAILED")
    ]
    if not failures:
        return "No failed resource events were recorded."
    return "Failed resources: " + "; ".join(reversed(failures))


def _events_since(cloudformation: Any, stack_name: str, started: datetime) -> list[dict[str, Any]]:
    """Return the events of the stack's latest operation, newest first.

    The operation begins with the stack's own CREATE_IN_PROGRESS or
    UPDATE_IN_PROGRESS event. Events older than ``started`` minus
    ``CLOCK_SKEW`` end the list too, in case that event is missing.
    """
    events: list[dict[str, Any]] = []
    oldest = started - CLOCK_SKEW
    request: dict[str, Any] = {"StackName": stack_name}
    for _ in range(MAX_EVENT_PAGES):
        try:
            response = cloudformation.describe_stack_events(**request)
        except ClientError:
            logger.warning("could not read the events of stack %s", stack_name, exc_info=True)
            return events
        for event in response.get("StackEvents", []):
            timestamp = event.get("Timestamp")
            if isinstance(timestamp, datetime) and timestamp.tzinfo and timestamp < oldest:
                return events
            events.append(event)
            if _is_operation_start(event, stack_name):
                return events
        if not response.get("NextToken"):
            return events
        request["NextToken"] = response["NextToken"]
    return events


def _is_operation_start(event: Mapping[str, Any], stack_name: str) -> bool:
    return (
        event.get("ResourceType") == "AWS::CloudFormation::Stack"
        and event.get("LogicalResourceId") == stack_name
        and event.get("ResourceStatus") in {"CREATE_IN_PROGRESS", "UPDATE_IN_PROGRESS"}
    )


def _outputs(stack: Mapping[str, Any]) -> dict[str, str]:
    return {entry["OutputKey"]: entry["OutputValue"] for entry in stack.get("Outputs", [])}


def _parse_parameter(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"parameter {text!r} is invalid: use KEY=VALUE")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """Deploy from the command line and print the stack outputs as JSON."""
    from taxi_pipeline.aws import AwsSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack-name", default="taxi-pipeline", help="stack name")
    parser.add_argument("--template", default="infra/template.yaml", help="template file")
    parser.add_argument("--artifacts-dir", default="build", help="folder built by `make package`")
    parser.add_argument(
        "--bucket",
        default=None,
        help="artifact bucket (default: <stack-name>-artifacts-<account>-<region>, created)",
    )
    parser.add_argument(
        "--parameter",
        action="append",
        default=[],
        type=_parse_parameter,
        metavar="KEY=VALUE",
        help="template parameter, repeatable",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the stack operation"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("taxi_pipeline").setLevel(logging.INFO)

    try:
        outputs = deploy_stack(
            args.stack_name,
            args.template,
            args.artifacts_dir,
            args.bucket,
            dict(args.parameter),
            AwsSettings.from_env(),
            timeout_seconds=args.timeout,
        )
    except (DeployError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(json.dumps(outputs, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
