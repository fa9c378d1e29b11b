"""The report of a notebook run: `<out>/index.html`, one page that opens offline.

The summary table (notebook, status, seconds, figures) with a link to each executed notebook's HTML,
then every notebook's figures (the PNGs it saved with `viz.save_figure`). Figures and pages are linked
by paths relative to `<out>`, so the folder can be moved, zipped or opened from disk: the page has no
script, no external style sheet and nothing from a CDN.

A partial run (`--only 02`) updates the rows of the notebooks it ran and keeps the others' from the
previous run, stored in `<out>/summary.json` (rows whose executed notebook is gone are dropped).

    write_report(results, "outputs")    # -> outputs/index.html
"""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

REPORT_FILE = "index.html"
SUMMARY_FILE = "summary.json"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.9em; text-align: left; }
td.seconds, td.figures { text-align: right; }
.ok { color: #17733a; font-weight: bold; } .failed { color: #b3261e; font-weight: bold; }
.error { color: #b3261e; font-family: monospace; white-space: pre-wrap; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 380px; } figure img { max-width: 380px; max-height: 300px; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; color: #555; }
"""


def write_report(results: Sequence, out_dir) -> Path:
    """Write `<out_dir>/index.html` (and `summary.json`) for `results` (`runner.NotebookResult`s) merged
    with the rows of earlier runs; returns the page's path."""
    out = Path(out_dir)
    rows, ran = {row["name"]: row for row in _earlier_rows(out)}, {r.name for r in results}
    rows.update({r.name: _row(r, out) for r in results})
    kept = [row for name, row in sorted(rows.items()) if name in ran or (out / f"{name}.ipynb").exists()]
    (out / SUMMARY_FILE).write_text(json.dumps(kept, indent=1), encoding="utf-8")
    page = out / REPORT_FILE
    page.write_text(render(kept), encoding="utf-8")
    return page


def render(rows: Sequence[dict], title: str = "instantid-lab: notebook run") -> str:
    """The report page for summary rows (name, ok, seconds, error, html, figures: paths relative to the page)."""
    failed = sum(not r["ok"] for r in rows)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>")
    intro = (f"<h1>{html.escape(title)}</h1><p>{len(rows)} notebook{'s' if len(rows) != 1 else ''}, {failed} failed, "
             f"{sum(r['seconds'] for r in rows):.1f} s in all · written {stamp}</p>")
    return "\n".join([head, intro, _table(rows), *(_section(r) for r in rows), "</body></html>\n"])


def _table(rows: Sequence[dict]) -> str:
    lines = ["<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>figures</th><th>executed</th></tr>"]
    for r in rows:
        status = '<span class="ok">ok</span>' if r["ok"] else '<span class="failed">FAILED</span>'
        page = _link(r["html"], "HTML") if r["html"] else "—"
        lines.append(f'<tr><td><a href="#{_anchor(r["name"])}">{html.escape(r["name"])}</a></td><td>{status}</td>'
                     f'<td class="seconds">{r["seconds"]:.1f}</td><td class="figures">{len(r["figures"])}</td>'
                     f"<td>{page}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _section(row: dict) -> str:
    title = f'<h2 id="{_anchor(row["name"])}">{html.escape(row["name"])}</h2>'
    error = f'<p class="error">{html.escape(row["error"])}</p>' if row["error"] else ""
    if not row["figures"]:
        return f"<section>{title}{error}<p><i>no figures saved</i></p></section>"
    figures = "".join(
        f'<figure><a href="{quote(f)}"><img src="{quote(f)}" alt="{html.escape(Path(f).stem)}" loading="lazy"></a>'
        f"<figcaption>{html.escape(Path(f).stem)}</figcaption></figure>" for f in row["figures"])
    return f'<section>{title}{error}<div class="gallery">{figures}</div></section>'


def _row(result, out: Path) -> dict:
    """A summary row of one `NotebookResult`, its paths relative to `out`."""
    return {"name": result.name, "ok": bool(result.ok), "seconds": round(float(result.seconds), 1),
            "error": result.error, "html": _relative(result.html, out),
            "figures": [_relative(f, out) for f in result.figures]}


def _earlier_rows(out: Path) -> list[dict]:
    try:
        return list(json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


def _relative(path: Optional[Path], out: Path) -> Optional[str]:
    if path is None or not Path(path).exists():
        return None
    return Path(path).resolve().relative_to(out.resolve()).as_posix()


def _link(target: str, text: str) -> str:
    return f'<a href="{quote(target)}">{html.escape(text)}</a>'


def _anchor(name: str) -> str:
    return "nb-" + "".join(c if c.isalnum() else "-" for c in name)
