"""Build the deployment artifacts for the two Lambda functions and the Glue job.

``build_artifacts`` writes four files to the output folder:

- ``start-taxi-trips.zip`` and ``end-taxi-trips.zip``: the handler ``app.py``
  at the zip root, the ``taxi_pipeline`` package without ``tooling/``, and the
  vendored ``aws_lambda_powertools``, ``typing_extensions`` and ``tzdata``.
  boto3 and botocore are left out because the Lambda Python runtime has them.
- ``replay_failed_trips.py``: the Glue job script, copied unchanged.
- ``taxi_pipeline.zip``: the library without ``tooling/``, plus ``tzdata``,
  for the job's ``--extra-py-files``.

The zips are reproducible: entries are sorted, every entry has the same
timestamp and permissions, and compiled files are left out, so two builds
from the same sources and the same installed packages give identical bytes.
Vendored packages are copied from the running Python environment, found
through ``importlib.metadata``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

# Function name -> folder under lambdas/ that contains its app.py.
FUNCTION_FOLDERS: dict[str, str] = {
    "start-taxi-trips": "start_taxi_trips",
    "end-taxi-trips": "end_taxi_trips",
}
HANDLER_FILE = "app.py"
JOB_SCRIPT = PurePosixPath("jobs/replay_failed_trips.py")
LIBRARY_PACKAGE = "taxi_pipeline"
LIBRARY_ARTIFACT = "taxi_pipeline.zip"

# Distributions copied into each function zip. The Lambda runtime provides
# boto3, botocore, jmespath and their dependencies.
FUNCTION_DISTRIBUTIONS = ("aws-lambda-powertools", "typing_extensions", "tzdata")
# The Glue 5.0 runtime provides boto3. tzdata supplies the IANA time zones
# (America/Los_Angeles) that zoneinfo reads.
LIBRARY_DISTRIBUTIONS = ("tzdata",)

# 1980-01-01 is the earliest time a zip entry can carry.
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = 0o100644
# Metadata files that vary with the installer or the install location, and
# that no runtime code reads.
SKIPPED_METADATA_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


class MissingSourceError(FileNotFoundError):
    """A source file or an installed package that an artifact needs is missing."""


@dataclass(frozen=True)
class Artifact:
    """One built file, with the size and SHA-256 digest of its bytes."""

    path: Path
    size: int
    sha256: str


def default_repo_root() -> Path:
    """Return the repository that contains this module (``lib/taxi_pipeline/tooling``)."""
    return Path(__file__).resolve().parents[3]


def build_artifacts(
    out_dir: str | os.PathLike[str] = "build", repo_root: str | os.PathLike[str] | None = None
) -> list[Artifact]:
    """Build every artifact into ``out_dir`` and return them in build order.

    A relative ``out_dir`` is taken from ``repo_root``, which defaults to the
    repository that contains this module. Other files in ``out_dir`` are left
    alone. Raises ``MissingSourceError`` naming the first missing handler, job
    script, library package or installed distribution.
    """
    root = Path(repo_root) if repo_root is not None else default_repo_root()
    root = root.resolve()
    out = Path(out_dir)
    if not out.is_absolute():
        out = root / out

    _check_sources(root)
    library_entries = _library_entries(root)

    out.mkdir(parents=True, exist_ok=True)
    artifacts: list[Artifact] = []

    function_vendor = _distribution_entries(FUNCTION_DISTRIBUTIONS)
    for function_name, folder in FUNCTION_FOLDERS.items():
        handler = root / "lambdas" / folder / HANDLER_FILE
        entries = {HANDLER_FILE: handler, **library_entries, **function_vendor}
        artifacts.append(_write_zip(out / f"{function_name}.zip", entries))

    job_script = root / JOB_SCRIPT
    artifacts.append(_write_bytes(out / job_script.name, job_script.read_bytes()))

    library_vendor = _distribution_entries(LIBRARY_DISTRIBUTIONS)
    artifacts.append(_write_zip(out / LIBRARY_ARTIFACT, {**library_entries, **library_vendor}))

    logger.debug("built %d artifacts in %s", len(artifacts), out)
    return artifacts


def format_manifest(artifacts: Iterable[Artifact], relative_to: Path | None = None) -> str:
    """Format one line per artifact: file, size in bytes and SHA-256 digest."""
    lines = []
    for artifact in artifacts:
        path = artifact.path
        if relative_to is not None and path.is_relative_to(relative_to):
            path = path.relative_to(relative_to)
        lines.append(f"{str(path):<40} {artifact.size:>10} {artifact.sha256}")
    return "\n".join(lines)


def _check_sources(root: Path) -> None:
    required = [root / "lambdas" / folder / HANDLER_FILE for folder in FUNCTION_FOLDERS.values()]
    required.append(root / JOB_SCRIPT)
    required.append(root / "lib" / LIBRARY_PACKAGE / "__init__.py")
    for path in required:
        if not path.is_file():
            raise MissingSourceError(
                f"missing source file {path}: the artifacts are built from it. "
                f"Check that {root} is the repository root"
            )


def _library_entries(root: Path) -> dict[str, Path]:
    """Map zip names to the library's files, without ``tooling/`` and compiled files."""
    package_dir = root / "lib" / LIBRARY_PACKAGE
    entries: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*")):
        relative = path.relative_to(package_dir.parent)
        parts = relative.parts
        if not path.is_file() or "__pycache__" in parts or path.suffix in {".pyc", ".pyo"}:
            continue
        if parts[1] == "tooling":
            continue
        entries[relative.as_posix()] = path
    return entries


def _distribution_entries(names: Sequence[str]) -> dict[str, Path]:
    """Map zip names to the installed files of each distribution in ``names``."""
    entries: dict[str, Path] = {}
    for name in names:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise MissingSourceError(
                f"package {name} is not installed in {sys.prefix}: "
                "install requirements/dev.txt into this environment"
            ) from exc
        if distribution.files is None:
            raise MissingSourceError(
                f"package {name} has no RECORD file listing its files: reinstall it with pip"
            )

        for file in distribution.files:
            parts = PurePosixPath(file).parts
            # Entries with ".." are scripts installed outside site-packages.
            if ".." in parts or "__pycache__" in parts or file.suffix in {".pyc", ".pyo"}:
                continue
            if parts[0].endswith(".dist-info") and parts[-1] in SKIPPED_METADATA_FILES:
                continue
            source = Path(distribution.locate_file(file))
            if not source.is_file():
                raise MissingSourceError(f"file {source} of package {name} is missing: reinstall the package")
            entries[PurePosixPath(file).as_posix()] = source
    return entries


def _write_zip(target: Path, entries: dict[str, Path]) -> Artifact:
    """Write ``entries`` to a reproducible zip at ``target``."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as handle:
        temporary = Path(handle.name)
        try:
            with zipfile.ZipFile(handle, "w") as archive:
                for name in sorted(entries):
                    info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = ZIP_FILE_MODE << 16
                    info.create_system = 3  # Unix, so the mode above applies
                    archive.writestr(info, entries[name].read_bytes(), compresslevel=9)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return _publish(temporary, target)


def _write_bytes(target: Path, data: bytes) -> Artifact:
    """Write ``data`` to ``target`` through a temporary file in the same folder."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as handle:
        handle.write(data)
    return _publish(Path(handle.name), target)


def _publish(temporary: Path, target: Path) -> Artifact:
    """Move a finished temporary file to ``target`` and describe it."""
    # Temporary files are created readable by the owner only (0600), unlike a build output.
    temporary.chmod(0o644)
    temporary.replace(target)
    data = target.read_bytes()
    return Artifact(path=target, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def main(argv: Sequence[str] | None = None) -> int:
    """Build the artifacts and print their manifest to standard output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        default="build",
        help="output folder, relative to the repository root (default: build)",
    )
    parser.add_argument(
        "--repo-root",
        default=None,
        help="repository root (default: the one that contains this module)",
    )
    args = parser.parse_args(argv)

    try:
        artifacts = build_artifacts(args.out_dir, args.repo_root)
    except MissingSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    root = Path(args.repo_root).resolve() if args.repo_root else default_repo_root()
    print(format_manifest(artifacts, relative_to=root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
