"""The documentation: the site builds strictly, and the README stays short and links into it correctly.

mkdocs.yml sets `strict: true` and warns on broken links and anchors, so a page linking to a missing
page or heading fails the build here rather than on a reader.
"""

import os
import re
import subprocess
import sys

from .conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
# [text](docs/page.md) or [text](docs/page.md#anchor); links to other repository files are not checked here.
DOCS_LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)(?:#([^)\s]+))?\)")


def _slug(heading: str) -> str:
    """The anchor of a heading, as Python-Markdown's toc and GitHub both make it for plain headings."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(page) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", page.read_text(), flags=re.MULTILINE)
    return {_slug(h) for h in headings}


def test_site_builds_strictly(tmp_path):
    # NO_MKDOCS_2_WARNING: Material's end-of-life banner would otherwise open every failure message.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert (tmp_path / "site" / "index.html").exists()


def test_every_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if f": {p.name}" not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < 300, f"README.md has {lines} lines; move detail into docs/ (the README is for running it)"


def test_readme_links_into_docs_resolve():
    links = DOCS_LINK.findall(README.read_text())
    assert links, "README.md should link to the documentation pages"
    broken = []
    for path, anchor in sorted(set(links)):
        page = REPO / path
        if not page.is_file():
            broken.append(f"{path} (no such page)")
        elif anchor and anchor not in _anchors(page):
            broken.append(f"{path}#{anchor} (no such heading)")
    assert not broken, "README.md links that lead nowhere: " + ", ".join(broken)
