"""Every numbered notebook runs headless in CI mode and saves its figures; the runner reports failures."""

import json

import nbformat
import pytest

from instantid_lab.notebooks import NOTEBOOKS_DIR, find_notebooks, main, run_notebook

NOTEBOOKS = find_notebooks(NOTEBOOKS_DIR)


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_ci_mode_and_saves_figures(path, tmp_path):
    result = run_notebook(path, tmp_path, ci=True)  # papermill raises if any cell fails
    executed = nbformat.read(result.output, as_version=4)
    assert executed.metadata["papermill"]["parameters"] == {"CI": True}
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # figures display inline
    assert result.figures, f"{path.name} saved no figure with viz.save_figure"
    assert all(f.stat().st_size > 1000 for f in result.figures)
    assert result.html is not None and result.html.stat().st_size > 0
    if path.stem == "08_playground":  # widgets cannot run in the exported page: it ends on the panel's picture
        displays = [o for o in outputs if "data" in o]
        assert "image/png" in displays[-1]["data"] and "data:image/png" in result.html.read_text()


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1 and "CI = False" in "".join(tagged[0]["source"]), path.name


def _write_notebook(path, *sources):
    cells = [nbformat.v4.new_code_cell("CI = False", metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(source) for source in sources]
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=kernel), path)


SAVES_A_FIGURE = """
from instantid_lab import viz
fig = viz.plot_bars(["a", "b"], [1.0, 2.0], ylabel="value")
assert viz.save_figure(fig, "bars") is not None
"""


def test_runner_injects_ci_saves_figures_and_reports_a_failing_notebook(tmp_path, capsys):
    notebooks, out = tmp_path / "notebooks", tmp_path / "out"
    notebooks.mkdir()
    _write_notebook(notebooks / "01_ok.ipynb", "assert CI is True", SAVES_A_FIGURE)
    _write_notebook(notebooks / "02_broken.ipynb", "raise RuntimeError('cell exploded')")
    (notebooks / "scratch.ipynb").write_text("not a numbered notebook, never run")
    run = ["--out", str(out), "--ci", "--notebooks-dir", str(notebooks)]

    assert main(run + ["--only", "01"]) == 0
    assert (out / "01_ok" / "bars.png").stat().st_size > 1000
    assert (out / "01_ok.html").exists() and not (out / "02_broken.ipynb").exists()

    assert main(run + ["--only", "02"]) == 1
    assert (out / "02_broken.ipynb").exists()  # the partial notebook is kept for reading
    report = capsys.readouterr().out
    assert "01_ok" in report and "02_broken" in report and "FAILED" in report and "cell exploded" in report
    assert not (out / "scratch.ipynb").exists()

    page = (out / "index.html").read_text()  # the report keeps both partial runs
    assert 'href="01_ok.html"' in page and '<img src="01_ok/bars.png"' in page
    assert "02_broken" in page and "FAILED" in page and "cell exploded" in page


def test_runner_selection(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in ("01_a.ipynb", "02_b.ipynb", "10_c.ipynb", "notes.ipynb"):
        _write_notebook(notebooks / name)
    assert [p.name for p in find_notebooks(notebooks)] == ["01_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in find_notebooks(notebooks, only=["02", "10"])] == ["02_b.ipynb", "10_c.ipynb"]
    assert main(["--out", str(tmp_path / "out"), "--only", "99", "--notebooks-dir", str(notebooks)]) == 2


# ----------------------------------------------------------------------------- figures (viz)


def test_save_figure_writes_into_the_runner_folder_only_when_set(tmp_path, monkeypatch):
    from PIL import Image

    from instantid_lab import viz

    fig = viz.plot_bars(["a"], [1.0], ylabel="y", references={"chance": 0.5})
    monkeypatch.delenv(viz.FIGURES_ENV, raising=False)
    assert viz.save_figure(fig, "bars") is None
    monkeypatch.setenv(viz.FIGURES_ENV, str(tmp_path / "figs"))
    path = viz.save_figure(fig, "bars / v2")
    assert path == tmp_path / "figs" / "bars_v2.png" and Image.open(path).format == "PNG"
    assert viz.save_figure(Image.new("RGB", (8, 8)), "plain").exists()


def test_plots_return_closed_figures_and_check_inputs():
    import matplotlib.pyplot as plt
    import numpy as np

    from instantid_lab import viz
    from instantid_lab.embeddings import PairScores
    from instantid_lab.errors import InputError

    figures = [
        viz.plot_similarity_matrix(np.eye(3), ["a", "b", "c"], metric="euclidean"),
        viz.plot_same_vs_different(PairScores(np.array([0.3, 0.4]), np.array([0.8, 0.9]), "euclidean"), threshold=0.6),
        viz.image_grid([np.zeros((8, 8, 3), np.uint8)] * 5, titles=list("abcde"), ncols=2),
    ]
    assert plt.get_fignums() == []  # nothing left open in pyplot
    assert len(figures[2].axes) == 6 and figures[2].axes[4].get_title() == "e"
    with pytest.raises(InputError):
        viz.plot_similarity_matrix(np.eye(3), ["a", "b"])
    with pytest.raises(InputError):
        viz.plot_bars(["a", "b"], [1.0], ylabel="y")
    with pytest.raises(InputError):
        viz.image_grid([])


def test_draw_faces_and_zoom(make_face):
    import numpy as np
    from PIL import Image

    from instantid_lab import viz
    from instantid_lab.keypoints import KPS_COLORS

    photo = Image.new("RGB", (200, 160), (40, 40, 40))
    face = make_face(50, 30, 100, np.ones(4))
    drawn = np.asarray(viz.draw_faces(photo, [face], labels=["1"]))
    assert np.asarray(photo).max() == 40  # the original is untouched
    for (x, y), colour in zip(face.kps, KPS_COLORS):
        assert tuple(drawn[int(y), int(x)]) == colour
    assert tuple(drawn[30, 100]) == (0, 255, 0)  # top edge of the box
    assert viz.zoom(photo, face.bbox, margin=0.1).size == (120, 120)
    assert viz.zoom(photo, face.bbox, margin=1.0).size == (200, 160)  # clipped to the image


# ----------------------------------------------------------------------------- the report


def test_report_lists_every_run_links_relative_paths_and_loads_nothing_from_outside(tmp_path):
    from PIL import Image

    from instantid_lab.notebooks import NotebookResult, write_report

    out = tmp_path / "out"
    (out / "01_a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out / "01_a" / "sweep grid.png")
    for name in ("01_a", "02_b", "03_gone"):
        (out / f"{name}.ipynb").write_text("{}")
    (out / "01_a.html").write_text("<html></html>")
    figure = out / "01_a" / "sweep grid.png"
    first = [NotebookResult("01_a", True, 3.14, out / "01_a.ipynb", [figure], out / "01_a.html"),
             NotebookResult("03_gone", True, 1.0, out / "03_gone.ipynb")]
    write_report(first, out)
    (out / "03_gone.ipynb").unlink()  # a notebook removed since: its row goes
    page = write_report([NotebookResult("02_b", False, 2.0, out / "02_b.ipynb", error="ValueError: <bad>")], out)
    text = page.read_text()
    assert page == out / "index.html"
    assert text.index("01_a") < text.index("02_b") and "03_gone" not in text
    assert '<img src="01_a/sweep%20grid.png"' in text and 'href="01_a.html"' in text
    assert "3.1" in text and "ValueError: &lt;bad&gt;" in text
    assert "<script" not in text and "<link" not in text and "http" not in text
    assert [r["name"] for r in json.loads((out / "summary.json").read_text())] == ["01_a", "02_b"]
