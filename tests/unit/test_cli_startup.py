"""Start-up: a command loads only what it uses (issue 12: kopf and the kubernetes client
took 0.86 s of every `nodemem report`). Each case is a fresh interpreter, as a user's
shell starts one; what it imported is read from its sys.modules after the command ran."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dev-shm-limit.yaml"
KUBERNETES_SIDE = {"kopf", "kubernetes", "aiohttp", "nodemem.kube", "nodemem.controller"}
KUBERNETES_SIDE |= {"nodemem.agent.main", "nodemem.agent.kubeapi", "nodemem.agent.listwatch"}
KUBERNETES_SIDE |= {"nodemem.agent.policy_feed", "nodemem.agent.node_feed"}
KUBERNETES_SIDE |= {"nodemem.agent.report_writer", "nodemem.agent.events"}
# What --help needs none of: the models, YAML, metrics.
COMMANDS_ONLY = {"pydantic", "yaml", "prometheus_client", "nodemem.api", "nodemem.policy"}

# Runs `main(argv)` and writes the packages and nodemem modules it loaded to a file
# (stdout is the command's).
PROBE = """
import json, sys
from nodemem.cli import main
argv, out = json.loads(sys.argv[1]), sys.argv[2]
try:
    code = main(argv)
except SystemExit as exc:
    code = exc.code
except Exception as exc:
    code = type(exc).__name__
names = {name for name in sys.modules}
names |= {name.split(".")[0] for name in names}
with open(out, "w") as file:
    json.dump({"code": code, "modules": sorted(names)}, file)
"""


def loaded_by(tmp_path: Path, *argv: str) -> tuple[int | str, set[str]]:
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.exists(), done.stderr
    result = json.loads(out.read_text())
    return result["code"], set(result["modules"])


def fake_proc(tmp_path: Path) -> Path:
    """A --proc-root with this host's meminfo and nothing else (no processes, no mounts)."""
    root = tmp_path / "proc"
    root.mkdir()
    shutil.copyfile("/proc/meminfo", root / "meminfo")
    return root


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["report", "--help"], ["apply", "--help"], ["agent", "--help"]],
    ids=["help", "report-help", "apply-help", "agent-help"],
)
def test_help_loads_no_command(tmp_path: Path, argv: list[str]) -> None:
    code, modules = loaded_by(tmp_path, *argv)
    assert code == 0
    assert modules.isdisjoint(KUBERNETES_SIDE | COMMANDS_ONLY), modules & (
        KUBERNETES_SIDE | COMMANDS_ONLY
    )


def test_report_never_loads_the_kubernetes_side(tmp_path: Path) -> None:
    code, modules = loaded_by(tmp_path, "report", "--json", "--proc-root", str(fake_proc(tmp_path)))
    assert code == 0
    assert "nodemem.policy.report" in modules  # it did run the report
    assert modules.isdisjoint(KUBERNETES_SIDE), modules & KUBERNETES_SIDE
    assert "prometheus_client" not in modules


def test_apply_and_crds_never_load_the_kubernetes_side(tmp_path: Path) -> None:
    code, modules = loaded_by(tmp_path, "apply", "-f", str(EXAMPLE), "--dry-run", "--json")
    assert code in (0, 1)  # 1: an item refused on this host; the modules are the point
    assert "nodemem.policy.apply" in modules
    assert modules.isdisjoint(KUBERNETES_SIDE), modules & KUBERNETES_SIDE
    code, modules = loaded_by(tmp_path, "crds", "--output-dir", str(tmp_path / "crds"))
    assert code == 0
    assert (tmp_path / "crds").is_dir()
    assert modules.isdisjoint(KUBERNETES_SIDE), modules & KUBERNETES_SIDE


@pytest.mark.parametrize(
    ("argv", "needs", "never"),
    [
        (["controller"], {"kopf", "kubernetes", "nodemem.controller"}, set()),
        # The agent follows the API with its own list-watch loop: kopf, its asyncio
        # machinery and aiohttp stay out of every node's agent.
        (
            ["agent", "--node-name", "n1"],
            {"kubernetes", "nodemem.agent.main", "nodemem.agent.listwatch"},
            {"kopf", "aiohttp", "nodemem.controller"},
        ),
    ],
    ids=["controller", "cluster-agent"],
)
def test_what_the_cluster_commands_load(
    tmp_path: Path, argv: list[str], needs: set[str], never: set[str]
) -> None:
    # Their imports moved into the commands: a kubeconfig that does not exist is refused
    # by the kubernetes client's loader, after every import of the command resolved.
    missing = str(tmp_path / "no-kubeconfig")
    code, modules = loaded_by(tmp_path, *argv, "--kubeconfig", missing)
    assert code == "ConfigException"
    assert needs <= modules, needs - modules
    assert modules.isdisjoint(never), modules & never
