"""The docs build end to end: a tiny book (an executed chapter with a figure, equations and a table; an unexecuted
chapter) built with Sphinx through the CLI, and the HTML checked as a reader would see it. One build, ~10 s."""
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nbformat
import pytest

from paperlab import docs
from paperlab.core import repo_root

md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell


def png(width: int = 4, height: int = 3) -> bytes:
    "A valid RGB PNG of a solid colour, made without any imaging library."
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + b"\xcc\x33\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_nb(path: Path, cells: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


def toy_cells(executed: bool) -> list:
    "The toy chapter; with `executed`, the outputs `paperlab reproduce` would have added."
    import base64
    cells = [md("# Toy chapter\n\nThe loss is $L = x^2$, and in display:\n\n$$x^2$$"),
             code("#| default_exp toy"),
             code("#| hide\nfrom fastcore.test import test_eq"),
             code("#| export\ndef square(x):\n    return x**2"),
             code("plot()"),
             code("ledger")]
    if executed:
        cells[4].outputs = [nbformat.v4.new_output("display_data", {"image/png": base64.b64encode(png()).decode(),
                                                                    "text/plain": "<Figure size 640x480>"})]
        cells[5].outputs = [nbformat.v4.new_output("execute_result", {
            "text/markdown": "| claim | reported | measured |\n|---|---|---|\n| speed-up | 2.1 | 1.87 |",
            "text/plain": "<Ledger>"}, execution_count=3)]
    return cells


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def widget_chapter(executed: bool):
    "A chapter whose figure is an ipywidgets `interactive`: run, its first figure sits in the saved state of the widget's Output."
    import base64
    cell = code("widgets.interactive(show, board=widgets.IntSlider(0, 0, 9))")
    nb = nbformat.v4.new_notebook(cells=[md("# Widget chapter"), cell])
    if executed:
        fig = {"output_type": "display_data", "metadata": {},
               "data": {"image/png": base64.b64encode(png(7, 5)).decode(), "text/plain": "<Figure size 640x480>"}}
        nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"version_major": 2, "version_minor": 0, "state": {
            "box": {"model_name": "VBoxModel", "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                    "state": {"_dom_classes": ["widget-interact"], "children": ["IPY_MODEL_slider", "IPY_MODEL_out"]}},
            "slider": {"model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                       "state": {"value": 0}},
            "out": {"model_name": "OutputModel", "model_module": "@jupyter-widgets/output", "model_module_version": "1.0.0",
                    "state": {"outputs": [fig]}}}}}
        cell.outputs = [nbformat.v4.new_output("execute_result", {WIDGET_MIME: {"version_major": 2, "version_minor": 0,
                                                                                 "model_id": "box"},
                                                                   "text/plain": "interactive(children=(IntSlider(...)))"},
                                               execution_count=1)]
    return nb


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "Build the toy book once with `python -m paperlab.docs build`; return the site folder."
    d = tmp_path_factory.mktemp("book")
    index = [md("# Toy book\n\nTwo chapters."), code("#| hide\nimport os")]
    write_nb(d / "nbs" / "index.ipynb", index)
    write_nb(d / "results" / "index" / "index.ipynb", index)
    write_nb(d / "nbs" / "10_toy.ipynb", toy_cells(executed=False))
    write_nb(d / "results" / "toy" / "10_toy.ipynb", toy_cells(executed=True))
    write_nb(d / "nbs" / "20_todo.ipynb", [md("# Todo chapter"), code("#| export\nanswer = 42")])
    write_nb(d / "nbs" / "30_widget.ipynb", widget_chapter(executed=False).cells)
    (d / "results" / "widget").mkdir(parents=True)
    nbformat.write(widget_chapter(executed=True), d / "results" / "widget" / "30_widget.ipynb")
    out = d / "site"
    (out).mkdir()
    (out / "stale.html").write_text("from the previous build")
    res = subprocess.run([sys.executable, "-m", "paperlab.docs", "build", "--out", str(out),
                          "--results", str(d / "results"), "--nbs", str(d / "nbs")],
                         cwd=repo_root(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out / "index.html")
    return out


def html(site: Path, page: str) -> str:
    return (site / page).read_text(encoding="utf-8")


def text(site: Path, page: str) -> str:
    "The words of a page, tags removed and spaces collapsed."
    return " ".join(re.sub(r"<[^>]+>", " ", html(site, page)).split())


def test_pages_in_file_order(site):
    index = html(site, "index.html")
    assert index.index('href="10_toy.html"') < index.index('href="20_todo.html"')
    assert not (site / "stale.html").exists()                      # the new site replaced the old one whole
    assert not list(site.parent.glob(".site.build-*"))            # and left no temporary folder


def test_figure_table_and_math(site):
    page = html(site, "10_toy.html")
    img = re.search(r'<img [^>]*src="(_images/[^"]+\.png)"', page)
    assert img and (site / img.group(1)).read_bytes() == png()
    assert re.search(r"<table[^>]*>.*<td[^>]*>(<p>)?1.87(</p>)?</td>", page, re.S)   # the markdown ledger output, as a table
    assert r"\[x^2\]" in page and r"\(L = x^2\)" in page          # $$x^2$$ and $L = x^2$ became MathJax math
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', page)
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax == ["_static/mathjax/tex-chtml.js"] and (site / mathjax[0]).exists()
    assert not [s for s in scripts if s.startswith(("http:", "https:", "//"))]


def test_directives_and_hidden_cells(site):
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "#|" not in text and "default_exp" not in text, page.name
        assert "fastcore.test" not in text and "import os" not in text, page.name
    assert "square" in html(site, "10_toy.html")


def test_unexecuted_notice(site):
    todo = text(site, "20_todo.html")
    assert "Not executed yet" in todo and "paperlab reproduce todo" in todo
    assert re.search(r'<div class="(warning admonition|admonition warning)">\s*<p class="admonition-title">Not executed yet',
                     html(site, "20_todo.html"))
    assert "Not executed yet" not in html(site, "10_toy.html")
    assert "out of date" not in html(site, "10_toy.html")          # the executed copy matches its source


@pytest.mark.parametrize("failure", ["status", "interrupt"])
def test_failed_build_keeps_previous_site(tmp_path, monkeypatch, failure):
    "A failing or interrupted Sphinx run leaves the old site and no temporary folder (Sphinx itself is stubbed)."
    import sphinx.cmd.build
    write_nb(tmp_path / "nbs" / "10_a.ipynb", [md("# A")])
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("previous")

    def broken(args):
        outdir = Path(args[-1])
        outdir.mkdir(parents=True)
        (outdir / "index.html").write_text("half")
        if failure == "interrupt": raise KeyboardInterrupt
        return 1
    monkeypatch.setattr(sphinx.cmd.build, "build_main", broken)
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else RuntimeError):
        docs.build_docs(tmp_path / "site", results=tmp_path / "results", nbs=tmp_path / "nbs")
    assert (tmp_path / "site" / "index.html").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_build", "nbs", "site"]


def test_readme_cli(tmp_path):
    "`python -m paperlab.docs readme` writes the index's prose and its markdown ledger, hiding code."
    write_nb(tmp_path / "index.ipynb", [md("# Toy book"), *toy_cells(executed=True)[1:]])
    res = subprocess.run([sys.executable, "-m", "paperlab.docs", "readme", "--out", str(tmp_path / "README.md"),
                          "--nb", str(tmp_path / "index.ipynb")], cwd=repo_root(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(docs.README_HEADER + "\n\n# Toy book\n")
    assert "| speed-up | 2.1 | 1.87 |" in text
    assert "def square" not in text and "<Figure" not in text and "<Ledger>" not in text


def test_readme_and_lab_index_link_every_chapter():
    "The index's chapter table links every notebook (in JupyterLab and the docs), and the README's links point into nbs/."
    import re
    from paperlab.cli import chapters
    from paperlab.docs import readme_markdown
    root = Path(__file__).resolve().parent.parent
    index = (root / "nbs" / "index.ipynb").read_text()
    readme = readme_markdown(root / "nbs" / "index.ipynb")
    for path in chapters(root / "nbs").values():
        if path.stem == "index": continue
        assert f"({path.name})" in index, f"index.ipynb does not link {path.name}"
        assert f"](nbs/{path.name})" in readme, f"README does not link nbs/{path.name}"
    assert not re.search(r"\]\((?!nbs/)[\w-]+\.ipynb\)", readme)


def test_make_lab_settings_silence_the_news_and_start_the_kernel():
    "`make lab` installs lab/overrides.json: no news popup, the preferred kernel started without a dialog, index.ipynb opened."
    import json
    root = Path(__file__).resolve().parent.parent
    o = json.loads((root / "lab" / "overrides.json").read_text())
    assert o["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert o["@jupyterlab/notebook-extension:tracker"]["autoStartDefaultKernel"] is True
    make = (root / "Makefile").read_text()
    assert "lab/overrides.json" in make and "default_url=/lab/tree/index.ipynb" in make


def test_a_widget_shows_its_first_state_once(site):
    "The page shows the figure that the widget drew first (from its saved state), once, and no widget markup or CDN script."
    page = html(site, "30_widget.html")
    imgs = re.findall(r'<img [^>]*src="(_images/[^"]+\.png)"', page)
    assert len(imgs) == 1 and (site / imgs[0]).read_bytes() == png(7, 5), imgs
    assert "interactive(children" not in page and "widget-view" not in page and "unpkg" not in page


def test_stopwatch_font_is_shipped_with_the_site_and_jupyterlab(site):
    "The committed stopwatch fonts are what `stopwatch_font` builds; both custom.css files load them for U+23F1 only."
    from fontTools.ttLib import TTFont
    root = repo_root()
    for rel in docs.STOPWATCH_FILES:
        built = docs.stopwatch_font(site.parent / "built.woff")
        assert (root / rel).read_bytes() == built.read_bytes(), f"{rel} is stale: run paperlab.docs.write_stopwatch_fonts()"
        css = ((root / rel).parent / "custom.css").read_text()
        face = re.search(r"@font-face\s*{([^}]*)}", css)
        assert face and f'"{docs.STOPWATCH_FAMILY}"' in face.group(1) and "unicode-range: U+23F1;" in face.group(1), rel
        assert f'url("{Path(rel).name}")' in face.group(1), rel
        assert TTFont(str(root / rel)).getBestCmap() == {0x23F1: "stopwatch"}
    # the site carries both files, and every page loads the css (font-family first in the theme's stacks)
    assert (site / "_static" / "paperlab-stopwatch.woff").exists() and "custom.css" in html(site, "10_toy.html")
    assert f'--pst-font-family-monospace: "{docs.STOPWATCH_FAMILY}"' in (site / "_static" / "custom.css").read_text()


def test_make_kernel_installs_the_lab_css_where_make_lab_reads_it():
    "`make kernel` copies lab/custom/ into the venv's Jupyter config dir; `make lab` starts JupyterLab there with custom_css."
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(["make", "-n", "-C", str(root), "VENV=/v", "-o", "/v/.paperlab-installed", "lab"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "cp lab/custom/* /v/etc/jupyter/custom/" in res.stdout
    assert 'JUPYTER_CONFIG_DIR="/v/etc/jupyter"' in res.stdout and "--LabApp.custom_css=True" in res.stdout
    css = (root / "lab" / "custom" / "custom.css").read_text()
    assert f'--jp-code-font-family: "{docs.STOPWATCH_FAMILY}", var(--jp-code-font-family-default)' in css
