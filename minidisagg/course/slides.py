"""``minidisagg slides build``: slides/*.ipynb -> self-contained reveal.js HTML (no network needed to view).

Each deck is converted with nbconvert's ``slides`` exporter. Everything a browser needs is put
inside the HTML file: reveal.js and its notes plugin as inline scripts, its stylesheets as
inline styles, figures as data URIs. reveal.js comes from a Python package that bundles it
(``pyreveal``; ``sphinx-revealjs`` also works), or from ``$MINIDISAGG_REVEAL_DIR``.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REVEAL_DIR_ENV = "MINIDISAGG_REVEAL_DIR"
REVEAL_THEME = "white"
# (package, folder inside it that holds reveal.js's dist/)
REVEAL_PACKAGES = (("pyreveal", "revealjs"), ("sphinx_revealjs", "_static/revealjs"))
NOTES_PLUGIN_PATHS = ("dist/plugin/notes.js", "plugin/notes/notes.js")  # reveal.js 6 / reveal.js 4-5
# stands in for reveal.js's URL while nbconvert renders; every use is then replaced by inline content
INLINE_PREFIX = "minidisagg-inline-reveal"
TAG_HIDE_INPUT = "hide-input"  # code cells whose output is shown without their code
TAG_REMOVE = "remove-cell"  # cells left out of the slides entirely

TEMPLATE_NAME = "minidisagg_slides.html.j2"
TEMPLATE = """{%- extends 'reveal/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{% block footer_js %}
<!--minidisagg:reveal.js-->
<!--minidisagg:notes.js-->
<script>
Reveal.initialize({
  controls: true, progress: true, history: true, hash: true,
  transition: "{{ reveal_transition }}", slideNumber: "c/t",
  width: {{ reveal_width }}, height: {{ reveal_height }},
  plugins: [RevealNotes],
});
</script>
{% endblock footer_js %}
"""


class SlidesError(RuntimeError):
    """A deck could not be built (missing reveal.js, unknown deck, a template that changed)."""


@dataclass(frozen=True)
class RevealAssets:
    """reveal.js files, read once, ready to be inlined."""

    source: Path
    reveal_js: str
    notes_js: str
    reveal_css: str
    theme_css: str


def _candidate_reveal_dirs() -> list[Path]:
    """Where reveal.js may be: ``$MINIDISAGG_REVEAL_DIR`` alone if set, else the packages that bundle it."""
    if os.environ.get(REVEAL_DIR_ENV):
        return [Path(os.environ[REVEAL_DIR_ENV]).expanduser()]
    found = []
    for package, inner in REVEAL_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            found.extend(Path(loc) / inner for loc in spec.submodule_search_locations)
    return found


def find_reveal(theme: str = REVEAL_THEME) -> RevealAssets:
    """Locate and read reveal.js (script, notes plugin, base and theme stylesheets); SlidesError if absent."""
    tried = []
    for root in _candidate_reveal_dirs():
        tried.append(str(root))
        notes = next((root / p for p in NOTES_PLUGIN_PATHS if (root / p).is_file()), None)
        needed = [root / "dist/reveal.js", root / "dist/reveal.css", root / f"dist/theme/{theme}.css"]
        if notes is None or not all(p.is_file() for p in needed):
            continue
        text = [p.read_text(encoding="utf-8") for p in (needed[0], notes, needed[1], needed[2])]
        return RevealAssets(root, *text)
    where = ", ".join(tried) if tried else "no package that bundles it is installed"
    raise SlidesError(
        f"reveal.js not found (looked in: {where}). Install a package that bundles it "
        f"(`pip install pyreveal`) or set {REVEAL_DIR_ENV} to a reveal.js folder with dist/reveal.js, "
        f"dist/theme/{theme}.css and the notes plugin."
    )


def _script(code: str) -> str:
    """An inline <script>; a literal ``</script`` inside the code would end it early, so it is escaped."""
    return "<script>\n" + re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE) + "\n</script>"


def _style(css: str) -> str:
    """An inline <style> block."""
    return '<style type="text/css">\n' + re.sub(r"</(style)", r"<\\/\1", css, flags=re.IGNORECASE) + "\n</style>"


def _link_pattern(href: str) -> str:
    """A regex for a <link> tag pointing at ``href``, whatever its attribute order."""
    return r'<link\b[^>]*\bhref="' + re.escape(href) + r'"[^>]*>'


def inline_reveal(page: str, assets: RevealAssets, theme: str = REVEAL_THEME) -> str:
    """Replace every reference to reveal.js in an exported page by the files' contents."""
    swaps = {
        _link_pattern(f"{INLINE_PREFIX}/dist/reveal.css"): _style(assets.reveal_css),
        _link_pattern(f"{INLINE_PREFIX}/dist/theme/{theme}.css"): _style(assets.theme_css),
        re.escape("<!--minidisagg:reveal.js-->"): _script(assets.reveal_js),
        re.escape("<!--minidisagg:notes.js-->"): _script(assets.notes_js),
    }
    for pattern, content in swaps.items():
        page, count = re.subn(pattern, lambda _match, c=content: c, page)
        if count != 1:
            raise SlidesError(f"the exported page has {count} matches of {pattern!r} (expected 1): "
                              "has nbconvert's reveal template changed?")
    if INLINE_PREFIX in page:
        raise SlidesError(f"a reference to reveal.js was left in the page: {INLINE_PREFIX!r}")
    return page


def make_exporter(theme: str = REVEAL_THEME):
    """nbconvert's SlidesExporter with this project's template, inlined images and no prompts."""
    from jinja2 import DictLoader
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {TAG_HIDE_INPUT}
    config.TagRemovePreprocessor.remove_cell_tags = {TAG_REMOVE}
    exporter = SlidesExporter(config=config, extra_loaders=[DictLoader({TEMPLATE_NAME: TEMPLATE})])
    exporter.template_file = TEMPLATE_NAME
    exporter.reveal_url_prefix = INLINE_PREFIX
    exporter.reveal_theme = theme
    exporter.embed_images = True  # markdown images become data URIs too
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    return exporter


def deck_paths(slides_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """The decks to build: every ``NN_*.ipynb`` in ``slides_dir``, or those whose name starts with one of ``names``."""
    decks = sorted(p for p in slides_dir.glob("[0-9][0-9]_*.ipynb"))
    if not decks:
        raise SlidesError(f"no decks (NN_topic.ipynb) in {slides_dir}")
    if not names:
        return decks
    chosen = [p for p in decks if any(p.stem == n or p.stem.startswith(n) for n in names)]
    unknown = [n for n in names if not any(p.stem == n or p.stem.startswith(n) for p in decks)]
    if unknown:
        raise SlidesError(f"no deck matches {unknown}; decks: {[p.stem for p in decks]}")
    return chosen


def build_deck(notebook: Path, out_dir: Path, assets: RevealAssets, exporter=None) -> Path:
    """Convert one executed deck into ``out_dir/<stem>.html``; returns the path written."""
    import nbformat

    exporter = exporter or make_exporter()
    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop("widgets", None)  # widget state would pull its renderer from the network
    resources = {"metadata": {"name": notebook.stem, "path": str(notebook.parent)}}
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    page = inline_reveal(body, assets, exporter.reveal_theme)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{notebook.stem}.html"
    out.write_text(page, encoding="utf-8")
    return out


def deck_title(notebook: Path) -> str:
    """The first heading of a deck (its title slide), or its file name."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return notebook.stem


def write_index(decks: Sequence[Path], pages: Sequence[Path], out_dir: Path) -> Path:
    """A plain index.html linking every built deck."""
    items = "\n".join(f'<li><a href="{html.escape(p.name)}">{html.escape(deck_title(d))}</a></li>'
                      for d, p in zip(decks, pages))
    index = out_dir / "index.html"
    index.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>minidisagg slides</title></head>\n"
                     f"<body><h1>minidisagg lectures</h1>\n<ol>\n{items}\n</ol></body></html>\n", encoding="utf-8")
    return index


def build_all(slides_dir: Path, out_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """Build the chosen decks (all by default) and an index; returns the deck pages written."""
    decks = deck_paths(slides_dir, names)
    assets = find_reveal()
    exporter = make_exporter()
    pages = [build_deck(d, out_dir, assets, exporter) for d in decks]
    write_index(decks, pages, out_dir)
    return pages


def default_slides_dir() -> Path:
    """``slides/`` of the checkout this package lives in, else ``./slides``."""
    here = Path(__file__).resolve().parents[2] / "slides"
    return here if here.is_dir() else Path("slides")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``minidisagg slides build [--out DIR] [--slides DIR] [DECK ...]``."""
    parser = argparse.ArgumentParser(prog="minidisagg slides build",
                                     description="Build slides/*.ipynb into self-contained reveal.js HTML.")
    parser.add_argument("decks", nargs="*", help="deck names or prefixes (e.g. 00 03_interference); default all")
    parser.add_argument("--out", default="build/slides", help="output folder (default build/slides)")
    parser.add_argument("--slides", default=None, help="folder of the deck notebooks (default: the checkout's slides/)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    slides_dir = Path(args.slides) if args.slides else default_slides_dir()
    try:
        pages = build_all(slides_dir, Path(args.out), args.decks)
    except SlidesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for page in pages:
        print(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB)")
    print(f"open {Path(args.out) / 'index.html'} in a browser (no network needed; press S for speaker notes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
