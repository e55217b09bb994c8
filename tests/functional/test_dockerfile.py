"""Static checks of the Glue 5.0 test image (Dockerfile), for machines without Docker.

They check what a failed ``docker build`` would otherwise report late: a COPY
source that is missing or excluded from the build context, an unpinned base
image, and test requirements that would replace Glue's own PySpark.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
GLUE_REQUIREMENTS = REPO_ROOT / "requirements" / "glue-image.txt"
DEV_REQUIREMENTS = REPO_ROOT / "requirements" / "dev.txt"

GLUE_IMAGE = "public.ecr.aws/glue/aws-glue-libs"
# A Glue 5.0 release tag (5.0.N) or a digest. The moving tags 5 and latest are not pins.
PINNED_REFERENCE = re.compile(r"^(:5\.0\.\d+(@sha256:[0-9a-f]{64})?|@sha256:[0-9a-f]{64})$")
GLUE_RUNTIME_PACKAGES = {"pyspark", "awsgluedataplanepython"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """Return (instruction, arguments) pairs, with continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = pending + stripped
        pending = ""
        keyword, _, arguments = logical.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path} ends inside a continued line"
    return instructions


def copy_sources(arguments: str) -> tuple[list[str], dict[str, str]]:
    """Split COPY arguments into the source paths and the --flag=value options."""
    rest = arguments.strip()
    flags = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    assert len(words) >= 2, f"COPY {arguments!r} needs a source and a destination"
    return words[:-1], flags


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Tell whether .dockerignore excludes ``relative`` or one of its parent folders."""
    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(PurePosixPath(prefix).name, bare):
                return True
    return False


def requirement_names(path: Path) -> dict[str, str]:
    """Map normalized package names to their version specifiers."""
    requirements = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", line)
        assert match, f"{path}: cannot parse {line!r}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        requirements[name] = match.group(2).strip()
    return requirements


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE)


def test_from_is_pinned_glue_image(instructions):
    bases = [arguments for keyword, arguments in instructions if keyword == "FROM"]

    assert len(bases) == 1
    image = bases[0].split()[0]
    assert image.startswith(GLUE_IMAGE), image
    assert PINNED_REFERENCE.match(image.removeprefix(GLUE_IMAGE)), image


def test_user_and_workdir(instructions):
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    workdirs = [arguments for keyword, arguments in instructions if keyword == "WORKDIR"]

    assert users == ["hadoop"]
    assert workdirs == ["/home/hadoop/workspace"]


def test_copy_sources_exist(instructions):
    copies = [arguments for keyword, arguments in instructions if keyword in {"COPY", "ADD"}]
    assert copies

    for arguments in copies:
        sources, flags = copy_sources(arguments)
        assert "from" not in flags, "this image has no build stages to copy from"
        for source in sources:
            matches = list(REPO_ROOT.glob(source)) if source != "." else [REPO_ROOT]
            assert matches, f"COPY source {source} does not exist in {REPO_ROOT}"


def test_copy_sources_not_ignored(instructions):
    patterns = dockerignore_patterns()

    for keyword, arguments in instructions:
        if keyword not in {"COPY", "ADD"}:
            continue
        sources, _ = copy_sources(arguments)
        for source in sources:
            if source != ".":
                assert not is_ignored(source, patterns), f"{source} is in .dockerignore"


def test_copies_owned_by_hadoop(instructions):
    for keyword, arguments in instructions:
        if keyword == "COPY":
            _, flags = copy_sources(arguments)
            assert flags.get("chown") == "hadoop:hadoop", arguments


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore_patterns()

    for path in [".git", ".venv", ".venv-ministack", "build", ".aws", "lib/x/__pycache__"]:
        assert is_ignored(path, patterns), path
    for path in ["lib/taxi_pipeline/events.py", "tests/conftest.py", "requirements/glue-image.txt"]:
        assert not is_ignored(path, patterns), path


def test_requirements_install_for_user(instructions):
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    installs = [run for run in runs if "glue-image.txt" in run]

    assert len(installs) == 1
    assert "pip install --user" in installs[0]


def test_glue_requirements_leave_out_glue_runtime():
    names = requirement_names(GLUE_REQUIREMENTS)

    assert not GLUE_RUNTIME_PACKAGES & set(names)
    assert "pytest" in names


def test_glue_requirements_match_dev_pins():
    glue = requirement_names(GLUE_REQUIREMENTS)
    dev = requirement_names(DEV_REQUIREMENTS)

    for name, specifier in glue.items():
        if specifier.startswith("=="):
            assert dev.get(name) == specifier, f"{name}{specifier} differs from requirements/dev.txt"


def test_cmd_runs_whole_suite(instructions):
    commands = [arguments for keyword, arguments in instructions if keyword == "CMD"]

    assert len(commands) == 1
    command = json.loads(commands[0])
    assert command == ["-c", "python3 -m pytest"]
