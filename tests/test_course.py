"""The notebooks' links into the glossary."""

import json
import re
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _glossary_links() -> dict[str, set[str]]:
    """The glossary anchors each notebook's markdown links to."""
    links = {}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        links[path.name] = set(re.findall(r"\(glossary\.md#([\w-]+)\)", text))
    return links


def test_every_glossary_link_names_an_entry_and_every_entry_is_linked():
    entries = set(re.findall(r'<a id="([\w-]+)"></a>', (NOTEBOOKS / "glossary.md").read_text()))
    links = _glossary_links()
    for notebook, anchors in links.items():
        assert anchors <= entries, f"{notebook} links to no entry {sorted(anchors - entries)}"
    unlinked = entries - set().union(*links.values())
    assert not unlinked, f"glossary entries no notebook links to: {sorted(unlinked)}"
