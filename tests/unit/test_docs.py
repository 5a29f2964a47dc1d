"""The documentation stands on its own: it points only inside the repository, its links
resolve, and the API reference is the one the models generate."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from api_reference import API_DOC, with_reference
from nodemem.api.crd import policy_crd

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
# Design notes that lived next to the repository, never in it: a reference to one is a dead
# link for anyone who clones it. Built from parts so that this file does not name them.
OUTSIDE = re.compile(
    r"\.\./shared|/work/shared|\b(?:design|kernel-memory|testing-kubernetes|real-components|peers)"
    r"\.md\b"
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
DOCS_MENTION = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def repository_files() -> list[Path]:
    """Tracked files and new ones not ignored (what the next commit would hold)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no file list to check")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / name for name in listed.decode().split("\0") if name]


def prose(text: str) -> str:
    """Markdown without code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -N repeats."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for path in repository_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not a text file
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "point to docs/ instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda page: page.name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif (
            anchor
            and linked.suffix == ".md"
            and anchor not in anchors(linked.read_text(encoding="utf-8"))
        ):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_mention_of_a_docs_page_in_the_repository_resolves() -> None:
    """Code comments cite `docs/<page>.md#<section>`: the page and the section must exist."""
    broken = []
    for path in repository_files():
        if not path.is_file() or path.suffix not in {".py", ".md", ".toml", ".yaml", ".tpl", ""}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for page, anchor in DOCS_MENTION.findall(text):
            target = REPO / "docs" / page
            if not target.is_file():
                broken.append(f"{path.relative_to(REPO)}: docs/{page}: no such page")
            elif anchor and anchor not in anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{path.relative_to(REPO)}: docs/{page}#{anchor}: no such section")
    assert not broken, "\n".join(broken)


def test_the_docs_folder_has_its_pages_and_the_readme_lists_them() -> None:
    names = {page.name for page in DOCS}
    assert {"architecture.md", "kernel-facts.md", "testing.md", "api.md"} <= names
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert f"(docs/{name})" in readme, f"README's Documentation list lacks docs/{name}"


def test_the_api_reference_is_generated_from_the_current_models() -> None:
    text = API_DOC.read_text(encoding="utf-8")
    assert text == with_reference(text), (
        "docs/api.md's field reference is out of date: run `make docs` "
        "(python tests/api_reference.py) and commit the result"
    )


def test_the_api_prose_describes_every_spec_field() -> None:
    """The generated table lists fields; the prose above it must say what each part is for."""
    schema = policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    written = API_DOC.read_text(encoding="utf-8").split("## Field reference")[0]
    missing = [name for name in schema["properties"]["spec"]["properties"] if name not in written]
    assert not missing, f"docs/api.md says nothing about spec fields {missing}"
