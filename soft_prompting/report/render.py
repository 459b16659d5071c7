"""Render the report's sections with the Jinja2 templates: one self-contained HTML page and Markdown.

The HTML template is autoescaped (a record's text is shown, never interpreted) and gets
``style.css`` inlined and every figure as a ``data:`` URI, so the page is one file that works
offline; the Markdown template links the PNGs beside it.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import jinja2

from soft_prompting.report.sections import short

HERE = Path(__file__).parent
HTML_TEMPLATE = "report.html.j2"
MARKDOWN_TEMPLATE = "report.md.j2"


def environment(html: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["md"] = markdown_escape
    env.filters["one_line"] = lambda text: short(text).replace("`", "'")
    return env


def markdown_escape(text) -> str:
    """Text with Markdown's markup characters escaped, on one line."""
    return re.sub(r"([\\`*_|\[\]<>])", r"\\\1", " ".join(str(text).split()))


def render_html(sections: dict, figures: dict[str, Path]) -> str:
    """The self-contained page: CSS inlined, images embedded as base64 PNGs."""

    def image_src(name: str) -> str | None:
        path = figures.get(name)
        if path is None or not Path(path).is_file():
            return None
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")

    css = (HERE / "style.css").read_text(encoding="utf-8")
    template = environment(html=True).get_template(HTML_TEMPLATE)
    return _tidy(template.render(s=sections, css=css, image_src=image_src))


def render_markdown(sections: dict, figures: dict[str, Path], out_dir: Path) -> str:
    """The Markdown twin: images linked relative to ``out_dir``."""

    def image_src(name: str) -> str | None:
        path = figures.get(name)
        if path is None or not Path(path).is_file():
            return None
        return Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()

    template = environment(html=False).get_template(MARKDOWN_TEMPLATE)
    return _tidy(template.render(s=sections, image_src=image_src))


def _tidy(text: str) -> str:
    """At most one blank line in a row, one newline at the end."""
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
