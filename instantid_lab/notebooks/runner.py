"""Execute the numbered notebooks headless, as `make run` does, and write the report.

    python -m instantid_lab.notebooks --out outputs [--ci] [--only 01 03]

Every `notebooks/[0-9][0-9]_*.ipynb` runs with papermill (kernel `python3`), with
`{"CI": True/False}` injected into its `parameters`-tagged cell. For a notebook `NN_name`:

- `<out>/NN_name.ipynb`   the executed notebook (written even when a cell fails)
- `<out>/NN_name.html`    the same, as HTML
- `<out>/NN_name/*.png`   its figures: the runner points $INSTANTID_LAB_FIGURES at this
  folder and the notebook calls `viz.save_figure(fig, name)`

At the end it prints a summary with the time per notebook and writes `<out>/index.html`, the
report (`report.write_report`: every notebook's figures and the summary table, readable offline).
The exit status is 1 if any notebook failed, so CI can run this directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from jupyter_client.manager import KernelManager
from tqdm.auto import tqdm
from traitlets import CaselessStrEnum

from ..viz import FIGURES_ENV
from .report import write_report

#: The repository's notebooks folder.
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOK_PATTERN = "[0-9][0-9]_*.ipynb"
#: Figures display inline in the executed notebooks even if the caller set another backend (tests use Agg).
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@dataclass
class NotebookResult:
    """The outcome of running one notebook."""

    name: str
    ok: bool
    seconds: float
    output: Path
    figures: list[Path] = field(default_factory=list)
    html: Optional[Path] = None
    error: Optional[str] = None


def find_notebooks(directory: Path = NOTEBOOKS_DIR, only: Optional[Sequence[str]] = None) -> list[Path]:
    """The numbered notebooks in `directory`, in order.

    :param only: keep the notebooks whose name starts with one of these (e.g. ["01", "03_pipe"]).
    """
    paths = sorted(Path(directory).glob(NOTEBOOK_PATTERN))
    if only:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in only)]
    return paths


class LocalKernelManager(KernelManager):
    """A `KernelManager` that talks to its kernel over local IPC sockets (files), not TCP: nothing
    goes over the network, so the kernel has no unencrypted-TCP warning to print."""

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)


def run_notebook(path: Path, out_dir: Path, ci: bool = False, kernel: str = "python3",
                 html: bool = True) -> NotebookResult:
    """Execute one notebook with papermill into `out_dir`; raises if a cell fails.

    :param path: the notebook to run.
    :param out_dir: receives `<stem>.ipynb`, `<stem>.html` and the figures in `<stem>/`.
    :param ci: value of the notebook's `CI` parameter (short runs on small settings).
    :raises papermill.PapermillExecutionError: a cell raised; the partial notebook is written.
    """
    import papermill

    path, out_dir = Path(path), Path(out_dir)
    output, figures = out_dir / path.name, _clean_figures_dir(out_dir / path.stem)
    start = time.perf_counter()
    try:
        with _environment({FIGURES_ENV: str(figures.resolve()), "MPLBACKEND": INLINE_BACKEND}):
            papermill.execute_notebook(
                str(path), str(output), parameters={"CI": ci}, kernel_name=kernel,
                cwd=str(path.parent), progress_bar=False, log_output=False,
                kernel_manager_class="instantid_lab.notebooks.runner.LocalKernelManager",
            )
    finally:
        page = export_html(output) if html else None
    return NotebookResult(
        name=path.stem, ok=True, seconds=time.perf_counter() - start, output=output,
        figures=sorted(figures.glob("*.png")), html=page,
    )


def run_all(paths: Sequence[Path], out_dir: Path, ci: bool = False, kernel: str = "python3") -> list[NotebookResult]:
    """Run notebooks one after another (a failure does not stop the others), with a progress bar."""
    results = []
    for path in (bar := tqdm(paths, desc="notebooks", unit="nb")):
        bar.set_postfix_str(path.stem)
        start = time.perf_counter()
        try:
            results.append(run_notebook(path, out_dir, ci=ci, kernel=kernel))
        except Exception as error:  # noqa: BLE001 - reported in the summary, and the exit status
            results.append(NotebookResult(
                name=path.stem, ok=False, seconds=time.perf_counter() - start, output=Path(out_dir) / path.name,
                figures=sorted((Path(out_dir) / path.stem).glob("*.png")), error=_short_error(error),
            ))
    return results


def export_html(notebook: Path) -> Optional[Path]:
    """Write `notebook` as HTML next to it; None if nbconvert is missing or the notebook is not there."""
    try:
        import nbformat
        from nbconvert import HTMLExporter
    except ImportError:
        return None
    if not notebook.exists():
        return None
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    page = notebook.with_suffix(".html")
    page.write_text(body, encoding="utf-8")
    return page


def summary(results: Sequence[NotebookResult]) -> str:
    """A table: notebook, status, seconds, number of figures; failures with their error."""
    width = max((len(r.name) for r in results), default=8)
    lines = [f"{'notebook':<{width}}  status  seconds  figures"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'ok' if r.ok else 'FAILED':<6}  {r.seconds:7.1f}  {len(r.figures):7d}")
        if r.error:
            lines.append(f"{'':<{width}}  {r.error}")
    total = sum(r.seconds for r in results)
    lines.append(f"{len(results)} notebooks, {sum(not r.ok for r in results)} failed, {total:.1f} s in all")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    paths = find_notebooks(args.notebooks_dir, args.only)
    if not paths:
        print(f"no notebooks matching {args.only or NOTEBOOK_PATTERN} in {args.notebooks_dir}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_all(paths, args.out, ci=args.ci, kernel=args.kernel)
    print(summary(results))
    report = write_report(results, args.out)
    print(f"executed notebooks, HTML and figures are in {args.out.resolve()}; the report: {report.resolve()}")
    return 0 if all(r.ok for r in results) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instantid_lab.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for executed notebooks and figures")
    parser.add_argument("--ci", action="store_true", help="set CI = True in every notebook (small, fast settings)")
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="run only notebooks starting with these, e.g. 01")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    return parser


def _clean_figures_dir(folder: Path) -> Path:
    """Create `folder`, removing figures of an earlier run so every PNG in it is from this run."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by the kernel) for the duration of the block."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _short_error(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else text}"[:300]
