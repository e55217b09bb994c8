"""The CloudFormation template (infra/template.yaml) and the artifact packaging."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file
from cfnlint.decode import cfn_yaml

from taxi_pipeline.tooling.packaging import (
    FUNCTION_FOLDERS,
    MissingSourceError,
    build_artifacts,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "infra" / "template.yaml"

CONTRACT_ENVIRONMENT = {
    "TABLE_NAME",
    "INVALID_TOPIC_ARN",
    "RETRY_QUEUE_URL",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "POWERTOOLS_LOG_LEVEL",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
}
JOB_ARGUMENTS = {
    "--extra-py-files",
    "--queue_url",
    "--table_name",
    "--dead_letter_queue_url",
    "--metrics_namespace",
    "--enable-metrics",
    "--enable-continuous-cloudwatch-log",
    "--enable-observability-metrics",
    "--job-language",
    "--TempDir",
}
ARTIFACT_NAMES = [
    "start-taxi-trips.zip",
    "end-taxi-trips.zip",
    "replay_failed_trips.py",
    "taxi_pipeline.zip",
]


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return cfn_yaml.load(str(TEMPLATE_PATH))


def resources_of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def iam_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Return (resource id and statement id, statement) for every permission statement."""
    statements = []
    for logical_id, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        documents = []
        if resource["Type"] == "AWS::IAM::Role":
            documents = [policy["PolicyDocument"] for policy in properties.get("Policies", [])]
        elif resource["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            documents = [properties["PolicyDocument"]]
        for document in documents:
            for statement in as_list(document["Statement"]):
                label = f"{logical_id}/{statement.get('Sid', '?')}"
                statements.append((label, statement))
    return statements


def parameter(template: dict[str, Any], value: Any) -> dict[str, Any]:
    """Return the parameter that ``value`` (a ``Ref``) names."""
    assert isinstance(value, dict) and "Ref" in value, f"{value!r} is not a parameter reference"
    return template["Parameters"][value["Ref"]]


# --- Template ---------------------------------------------------------------


def test_cfn_lint_reports_nothing():
    config = ManualArgs(include_checks=["I"], regions=["us-east-1", "eu-west-1"])

    matches = lint_file(TEMPLATE_PATH, config=config)

    assert [str(match) for match in matches] == []


def test_iam_statements_exist(template):
    labels = [label for label, _ in iam_statements(template)]

    assert any(label.startswith("StartFunctionRole/") for label in labels)
    assert any(label.startswith("EndFunctionRole/") for label in labels)
    assert any(label.startswith("ReplayJobRole/") for label in labels)


def test_iam_actions_have_no_wildcard(template):
    for label, statement in iam_statements(template):
        assert "NotAction" not in statement, label
        for action in as_list(statement["Action"]):
            assert action != "*", label
            assert not action.endswith(":*"), f"{label}: {action}"


def test_iam_resources_are_scoped(template):
    for label, statement in iam_statements(template):
        assert "NotResource" not in statement, label
        assert "Resource" in statement, label
        resources = as_list(statement["Resource"])
        if "*" not in resources:
            continue

        # The one documented exception: PutMetricData has no resource-level
        # permissions, so a namespace condition scopes it instead.
        assert as_list(statement["Action"]) == ["cloudwatch:PutMetricData"], label
        namespaces = statement["Condition"]["StringEquals"]["cloudwatch:namespace"]
        assert {"Ref": "MetricsNamespace"} in as_list(namespaces), label


def test_iam_uses_no_managed_policies(template):
    for logical_id, role in resources_of_type(template, "AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role["Properties"], logical_id


def test_event_source_mappings_report_and_bisect(template):
    mappings = resources_of_type(template, "AWS::Lambda::EventSourceMapping")
    assert set(mappings) == {"StartTripEventSourceMapping", "EndTripEventSourceMapping"}

    for logical_id, mapping in mappings.items():
        properties = mapping["Properties"]
        assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"], logical_id
        assert properties["BisectBatchOnFunctionError"] is True, logical_id
        assert properties["StartingPosition"] == "TRIM_HORIZON", logical_id
        assert "Destination" in properties["DestinationConfig"]["OnFailure"], logical_id


def test_event_source_mapping_retries_are_bounded(template):
    mappings = resources_of_type(template, "AWS::Lambda::EventSourceMapping")

    for logical_id, mapping in mappings.items():
        properties = mapping["Properties"]
        retries = parameter(template, properties["MaximumRetryAttempts"])
        record_age = parameter(template, properties["MaximumRecordAgeInSeconds"])

        # -1 would mean "retry forever" for both settings.
        assert retries["MinValue"] >= 0, logical_id
        assert retries["MaxValue"] <= 10000, logical_id
        assert record_age["MinValue"] >= 60, logical_id
        assert record_age["MaxValue"] <= 604800, logical_id


def test_functions_follow_contract(template):
    functions = resources_of_type(template, "AWS::Lambda::Function")
    assert set(functions) == {"StartFunction", "EndFunction"}

    for logical_id, function in functions.items():
        properties = function["Properties"]
        assert properties["Runtime"] == "python3.11", logical_id
        assert properties["Handler"] == "app.lambda_handler", logical_id
        assert properties["Code"]["S3Bucket"] == {"Ref": "ArtifactBucket"}, logical_id
        assert set(properties["Environment"]["Variables"]) == CONTRACT_ENVIRONMENT, logical_id
        assert properties["Environment"]["Variables"]["AWS_RETRY_MODE"] == "standard"
        assert properties["Environment"]["Variables"]["AWS_MAX_ATTEMPTS"] == "3"


def test_replay_job_follows_contract(template):
    job = template["Resources"]["ReplayJob"]["Properties"]

    assert job["GlueVersion"] == "5.0"
    assert job["Command"]["Name"] == "glueetl"
    assert job["ExecutionProperty"]["MaxConcurrentRuns"] == 1
    assert set(job["DefaultArguments"]) == JOB_ARGUMENTS


def test_replay_trigger_is_scheduled(template):
    trigger = template["Resources"]["ReplayTrigger"]["Properties"]

    assert trigger["Type"] == "SCHEDULED"
    assert trigger["StartOnCreation"] is True
    assert trigger["Schedule"] == {"Fn::Sub": "cron(${ReplaySchedule})"}
    assert template["Parameters"]["ReplaySchedule"]["Default"] == "0/15 * * * ? *"


def test_queues_keep_messages_fourteen_days(template):
    queues = resources_of_type(template, "AWS::SQS::Queue")

    for logical_id, queue in queues.items():
        assert queue["Properties"]["MessageRetentionPeriod"] == 1209600, logical_id
        assert queue["Properties"]["SqsManagedSseEnabled"] is True, logical_id


def test_retry_queue_redrives_to_dead_letter_queue(template):
    retry_queue = template["Resources"]["RetryQueue"]["Properties"]

    redrive = retry_queue["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["RetryDeadLetterQueue", "Arn"]}
    assert parameter(template, redrive["maxReceiveCount"])["Default"] == 5
    assert parameter(template, retry_queue["VisibilityTimeout"])["Default"] == 900


# --- Packaging --------------------------------------------------------------


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """Copy the library into a repository of its own, with stand-in handlers and job script.

    The stand-ins keep these tests independent of the real entry scripts. A
    tooling module and a compiled file check that both stay out of the zips.
    """
    root = tmp_path / "repo"
    shutil.copytree(
        REPO_ROOT / "lib" / "taxi_pipeline",
        root / "lib" / "taxi_pipeline",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    (root / "lib" / "taxi_pipeline" / "tooling").mkdir(exist_ok=True)
    (root / "lib" / "taxi_pipeline" / "tooling" / "stand_in.py").write_text("VALUE = 1\n")
    (root / "lib" / "taxi_pipeline" / "__pycache__").mkdir()
    (root / "lib" / "taxi_pipeline" / "__pycache__" / "events.cpython-311.pyc").write_bytes(b"x")

    for folder in FUNCTION_FOLDERS.values():
        handler = root / "lambdas" / folder / "app.py"
        handler.parent.mkdir(parents=True)
        handler.write_text(
            f'"""Stand-in handler of {folder}."""\n\n\n'
            "def lambda_handler(event, context):\n"
            '    return {"batchItemFailures": []}\n'
        )
    (root / "jobs").mkdir()
    (root / "jobs" / "replay_failed_trips.py").write_text('"""Stand-in job script."""\n')
    return root


def zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def test_packaging_is_reproducible(source_tree, tmp_path):
    first = build_artifacts(tmp_path / "first", repo_root=source_tree)
    second = build_artifacts(tmp_path / "second", repo_root=source_tree)

    assert [artifact.path.name for artifact in first] == ARTIFACT_NAMES
    for first_artifact, second_artifact in zip(first, second, strict=True):
        name = first_artifact.path.name
        assert first_artifact.path.read_bytes() == second_artifact.path.read_bytes(), name
        assert first_artifact.sha256 == second_artifact.sha256, name


def test_relative_out_dir_under_root(source_tree):
    artifacts = build_artifacts("build", repo_root=source_tree)

    assert {artifact.path.parent for artifact in artifacts} == {source_tree / "build"}


def test_function_zip_contents(source_tree, tmp_path):
    build_artifacts(tmp_path / "build", repo_root=source_tree)

    for function_name in FUNCTION_FOLDERS:
        names = zip_names(tmp_path / "build" / f"{function_name}.zip")
        top_level = {name.split("/")[0] for name in names}

        assert "app.py" in names, function_name
        assert "taxi_pipeline/__init__.py" in names, function_name
        assert "aws_lambda_powertools/__init__.py" in names, function_name
        assert "typing_extensions.py" in names, function_name
        assert "tzdata/zoneinfo/America/Los_Angeles" in names, function_name
        assert "boto3" not in top_level, function_name
        assert "botocore" not in top_level, function_name
        assert not [name for name in names if name.startswith("taxi_pipeline/tooling/")]
        assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
        assert names == sorted(names), function_name


def test_function_zip_has_fixed_timestamps(source_tree, tmp_path):
    build_artifacts(tmp_path / "build", repo_root=source_tree)

    with zipfile.ZipFile(tmp_path / "build" / "start-taxi-trips.zip") as archive:
        stamps = {info.date_time for info in archive.infolist()}
        modes = {info.external_attr >> 16 for info in archive.infolist()}

    assert stamps == {(1980, 1, 1, 0, 0, 0)}
    assert modes == {0o100644}


def test_function_zip_handler_unchanged(source_tree, tmp_path):
    build_artifacts(tmp_path / "build", repo_root=source_tree)

    for function_name, folder in FUNCTION_FOLDERS.items():
        with zipfile.ZipFile(tmp_path / "build" / f"{function_name}.zip") as archive:
            handler = archive.read("app.py")
        assert handler == (source_tree / "lambdas" / folder / "app.py").read_bytes()


def test_library_zip_contents(source_tree, tmp_path):
    build_artifacts(tmp_path / "build", repo_root=source_tree)

    names = zip_names(tmp_path / "build" / "taxi_pipeline.zip")
    top_level = {name.split("/")[0] for name in names}

    assert "taxi_pipeline/__init__.py" in names
    assert "tzdata/zoneinfo/America/Los_Angeles" in names
    assert "aws_lambda_powertools" not in top_level
    assert "boto3" not in top_level
    assert not [name for name in names if name.startswith("taxi_pipeline/tooling/")]


def test_job_script_is_copied(source_tree, tmp_path):
    build_artifacts(tmp_path / "build", repo_root=source_tree)

    copied = (tmp_path / "build" / "replay_failed_trips.py").read_bytes()
    assert copied == (source_tree / "jobs" / "replay_failed_trips.py").read_bytes()


def test_packaging_missing_handler_is_named(source_tree, tmp_path):
    (source_tree / "lambdas" / "end_taxi_trips" / "app.py").unlink()

    with pytest.raises(MissingSourceError, match=r"lambdas/end_taxi_trips/app\.py"):
        build_artifacts(tmp_path / "build", repo_root=source_tree)

    assert not (tmp_path / "build").exists()


def test_packaging_missing_job_script_is_named(source_tree, tmp_path):
    (source_tree / "jobs" / "replay_failed_trips.py").unlink()

    with pytest.raises(MissingSourceError, match=r"jobs/replay_failed_trips\.py"):
        build_artifacts(tmp_path / "build", repo_root=source_tree)
