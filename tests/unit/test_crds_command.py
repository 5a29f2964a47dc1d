"""`nodemem crds` prints or writes exactly the committed CRDs (the chart carries them too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodemem.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_writes_the_committed_files(tmp_path: Path) -> None:
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (ROOT / "crds").iterdir())
    for name in written:
        assert (tmp_path / name).read_text() == (ROOT / "crds" / name).read_text()
        assert (ROOT / "charts/nodemem/crds" / name).read_text() == (
            ROOT / "crds" / name
        ).read_text()


def test_prints_both_as_one_stream(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["spec"]["names"]["kind"] for d in documents] == [
        "NodeMemoryPolicy",
        "NodeMemoryReport",
    ]
