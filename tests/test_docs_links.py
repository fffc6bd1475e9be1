"""The Markdown guides' relative links and anchors resolve, and the README stays a short guide (issue #32).

Checked: README.md, docs/*.md, cluster/README.md and examples/*/README.md. Every inline link or image
``[text](target)`` outside code is followed unless it is http(s) or mailto: the file (``#…`` stripped) must
exist relative to the linking file, and an anchor into a Markdown file (or ``#anchor`` into the same one) must
be the GitHub slug of one of its headings. Targets outside the repository (``../shared/…``, beside the
checkout on the machine the project is developed on) are checked only where that folder is present.
No Ray, no MLflow: a fraction of a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)


def guide_files() -> list[Path]:
    """The Markdown files whose links are checked."""
    files = [REPO / "README.md", REPO / "cluster" / "README.md"]
    files += sorted((REPO / "docs").glob("*.md")) + sorted((REPO / "examples").glob("*/README.md"))
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            if fenced is None:
                fenced = fence.group(1)
            elif fence.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading reads as its text
    text = re.sub(r"[`*]|(?<!\w)_+|_+(?!\w)", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's slug in a Markdown file, repeated headings numbered -1, -2, … as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link in the file's prose."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)):
            target = match.group(2).strip("<>")
            if not EXTERNAL.match(target):
                found.append((number, target))
    return found


def problem(source: Path, target: str) -> str | None:
    """Why ``target``, linked from ``source``, does not resolve; None when it does."""
    file_part, _, anchor = target.partition("#")
    resolved = (source.parent / file_part).resolve() if file_part else source
    if not resolved.exists():
        return f"{file_part} does not exist (looked for {resolved})"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"no heading with anchor #{anchor} in {resolved.name}"
    return None


def inside_repo(source: Path, target: str) -> bool:
    return (source.parent / target.partition("#")[0]).resolve().is_relative_to(REPO)


def all_links() -> list[tuple[Path, int, str]]:
    return [(f, number, target) for f in guide_files() for number, target in links(f)]


def test_every_relative_link_in_the_guides_resolves():
    checked = [(f, n, t) for f, n, t in all_links() if inside_repo(f, t)]
    assert len(checked) >= 10, "the link finder found almost nothing: has its pattern broken?"
    broken = [f"{f.relative_to(REPO)}:{n}: ({t}) {why}" for f, n, t in checked if (why := problem(f, t))]
    assert broken == []


def beside_the_checkout(source: Path, target: str) -> Path | None:
    """The folder beside the repository that an outside target lies in (``../shared``), or None."""
    resolved = (source.parent / target.partition("#")[0]).resolve()
    if not resolved.is_relative_to(REPO.parent) or resolved.is_relative_to(REPO):
        return None
    return REPO.parent / resolved.relative_to(REPO.parent).parts[0]


def test_links_outside_the_repository_resolve_where_their_folder_is_present():
    outside = [(f, n, t) for f, n, t in all_links() if not inside_repo(f, t)]
    present = [(f, n, t) for f, n, t in outside if (folder := beside_the_checkout(f, t)) and folder.is_dir()]
    if not present:
        pytest.skip(f"{len(outside)} link(s) point beside the checkout, whose folders are absent here")
    broken = [f"{f.relative_to(REPO)}:{n}: ({t}) {why}" for f, n, t in present if (why := problem(f, t))]
    assert broken == []


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("From this machine to a cluster: `raygd project`", "from-this-machine-to-a-cluster-raygd-project"),
        ("Benchmarks (2 cores)", "benchmarks-2-cores"),
        (
            "1. Figure 3a — loss ratio L(B=512)/L(B=16) against replication r",
            "1-figure-3a--loss-ratio-lb512lb16-against-replication-r",
        ),
        ("Measuring gradient diversity Δ_D", "measuring-gradient-diversity-δ_d"),
        ("Bring your own Ray Train loop: `raygd.attach`", "bring-your-own-ray-train-loop-raygdattach"),
    ],
)
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_and_a_missing_anchor_are_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Other file\n\n## A section: `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[ok](other.md) [ok](other.md#a-section-code) [ok](#here) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad self](#there)\n"
        "`[in code](ignored.md)`\n\n```\n[in a block](ignored.md)\n# not a heading\n```\n"
    )
    found = links(page)
    assert [t for _, t in found] == [
        "other.md",
        "other.md#a-section-code",
        "#here",
        "missing.md",
        "other.md#nowhere",
        "#there",
    ]
    assert [t for _, t in found if problem(page, t)] == ["missing.md", "other.md#nowhere", "#there"]
    assert "not-a-heading" not in anchors(page)
