"""The book in a real browser (Playwright driving the system Chromium): every page of the docs site, and a chapter in
JupyterLab with its ipywidgets control.

`make verify` runs these after building the site from quick-mode runs: PAPERLAB_DOCS names the site and
PAPERLAB_RESULTS the executed chapters it was built from. Without PAPERLAB_DOCS the site is built here, into a
temporary folder, from PAPERLAB_RESULTS (or results/). They skip, saying why, only when there is no Chromium
(`apt-get install chromium`; `.ci/run` installs it): Playwright's own browser download cannot reach its servers."""
from __future__ import annotations

import functools
import http.server
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# the cheapest chapter with a widget in quick mode, and its control (an ipywidgets Dropdown over the 36 scenarios)
LAB_CHAPTER = os.environ.get("PAPERLAB_LAB_CHAPTER", "20_unitta.ipynb")


def find_chromium() -> str | None:
    "The system Chromium: $PAPERLAB_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH."
    if os.environ.get("PAPERLAB_CHROMIUM"): return os.environ["PAPERLAB_CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium; "
                                "`.ci/run` installs it): Playwright's own browser download cannot reach its servers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        # --no-sandbox: Chromium refuses to start its sandbox as root (CI containers)
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def results_folder() -> Path:
    return Path(os.environ.get("PAPERLAB_RESULTS", ROOT / "results"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The built docs site: $PAPERLAB_DOCS, or built here from the executed chapters."
    if os.environ.get("PAPERLAB_DOCS"):
        out = Path(os.environ["PAPERLAB_DOCS"])
        assert (out / "index.html").exists(), f"no docs site in {out}: run `paperlab docs build --out {out}` first"
        return out
    from paperlab.docs import build_docs
    out = tmp_path_factory.mktemp("site") / "_docs"
    build_docs(out, results=results_folder())
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def served(site):
    "The site over http on a free local port (file:// would block the search index and MathJax's fetches)."
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def pages(site: Path) -> list[str]:
    "Every HTML page at the top of the site (chapters, index, search, genindex)."
    return sorted(p.name for p in site.glob("*.html"))


MATH_JS = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const math = [...document.querySelectorAll('.math')];
  return {math: math.length,
          typeset: math.filter(e => e.querySelector('mjx-container') || e.tagName === 'MJX-CONTAINER').length,
          errors: document.querySelectorAll('mjx-merror').length,
          raw: math.filter(e => !e.querySelector('mjx-container') && /\\\\[a-zA-Z]+|\\$/.test(e.textContent)).map(e => e.textContent.slice(0, 60))};
}"""

IMAGES_JS = """() => [...document.images].map(i => ({src: i.currentSrc.slice(0, 80), ok: i.complete && i.naturalWidth > 0}))"""

TABLES_JS = """() => [...document.querySelectorAll('table')].map(t => ({
  head: [...t.querySelectorAll('thead th, tr:first-child th')].map(h => h.textContent.trim()),
  first: [...t.querySelectorAll('tbody tr')].map(r => r.querySelector('td') ? r.querySelector('td').textContent.trim() : '')}))"""


@pytest.fixture(scope="module")
def visited(browser, site, served) -> dict[str, dict]:
    "Open every page once, wait for MathJax, and record console errors, math, images and tables."
    out = {}
    for name in pages(site):
        page = browser.new_page()
        errors = []
        page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.on("requestfailed", lambda r, errors=errors: errors.append(f"request failed: {r.url}"))
        resp = page.goto(f"{served}/{name}", wait_until="load")
        rec = dict(status=resp.status if resp else None, math=page.evaluate(MATH_JS))
        page.wait_for_load_state("networkidle")
        rec.update(errors=errors, images=page.evaluate(IMAGES_JS), tables=page.evaluate(TABLES_JS))
        out[name] = rec
        page.close()
    return out


def test_site_has_a_page_per_notebook(site):
    from paperlab.cli import chapters
    missing = [p.stem for p in chapters().values() if not (site / f"{p.stem}.html").exists()]
    assert not missing, f"no page for {missing}"


def test_every_page_loads_without_console_errors(visited):
    bad = {n: (r["status"], r["errors"]) for n, r in visited.items() if r["status"] != 200 or r["errors"]}
    assert not bad, bad


def test_mathjax_typeset_every_equation(visited):
    with_math = {n: r["math"] for n, r in visited.items() if r["math"]["math"]}
    assert with_math, "no page has any math: the chapters' equations are missing"
    bad = {n: m for n, m in with_math.items() if m["typeset"] != m["math"] or m["errors"] or m["raw"]}
    assert not bad, bad


def test_every_image_has_loaded(visited):
    assert sum(len(r["images"]) for r in visited.values()) > 0, "no images at all: the chapters' figures are missing"
    bad = {n: [i["src"] for i in r["images"] if not i["ok"]] for n, r in visited.items()}
    assert not {n: v for n, v in bad.items() if v}, bad


def test_each_chapter_page_shows_its_ledger_table(visited):
    from paperlab.cli import chapters
    from paperlab.ledger import all_ledgers
    ledgers = all_ledgers(results_folder())
    assert ledgers, f"no claims.json under {results_folder()}: the chapters have not been run"
    nbs = chapters()
    for name, led in ledgers.items():
        page = f"{nbs[name].stem}.html"
        tables = [t for t in visited[page]["tables"] if "verdict" in t["head"]]
        assert tables, f"{page}: no table with a verdict column"
        shown = {i for t in tables for i in t["first"]}
        missing = [c for c in led.claims if c not in shown]
        assert not missing, f"{page}: the ledger table lacks claims {missing}"


# --- JupyterLab -----------------------------------------------------------------------------------------------

@pytest.fixture
def lab(tmp_path):
    "JupyterLab from this environment, headless on a free port with a token, serving a copy of the chapter."
    root = tmp_path / "nbs"
    root.mkdir()
    shutil.copy(ROOT / "nbs" / LAB_CHAPTER, root / LAB_CHAPTER)  # a copy: autosave must not write into nbs/
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PAPERLAB_MODE": "quick",
           "PAPERLAB_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    # the kernel must be this environment's Python: `python3` with argv `python` is resolved by jupyter_client to
    # sys.executable of the server, which runs from this venv
    cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}"]
    if os.geteuid() == 0: cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "lab.log").read_text()[-3000:]
                time.sleep(0.5)
        yield dict(base=base, token=token, proc=proc, log=tmp_path / "lab.log")
    finally:
        if proc.poll() is None:  # the test failed before its own shutdown
            proc.terminate()
            proc.wait(30)
        log.close()


def lab_idle(page, timeout_s: float) -> None:
    "Wait until the status bar says the kernel is idle."
    # the status bar reads "<kernel display name> | Idle": "Python 3 (paperlab)" once `make kernel` has run
    page.get_by_text(re.compile(r"\((ipykernel|paperlab)\) \| Idle")).wait_for(timeout=timeout_s * 1000)


def figure_src(interact) -> str:
    "The data URL of the figure the widget's output area shows."
    img = interact.locator(".widget-output img").first
    img.wait_for(timeout=120_000)
    return img.get_attribute("src")


def test_jupyterlab_runs_a_chapter_and_its_widget_redraws_the_plot(browser, lab):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(f"{lab['base']}/lab/tree/{LAB_CHAPTER}?reset&token={lab['token']}")
    page.wait_for_selector(".jp-Notebook")
    lab_idle(page, 120)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    interact = page.locator(".widget-interact").first
    interact.wait_for(timeout=300_000)
    lab_idle(page, 300)  # the kernel answers the widget only once the whole chapter has run
    # Run All stops at a failing cell: every code cell must show an execution count, none "[ ]" or "[*]"
    prompts = page.evaluate("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())")
    assert prompts and all(re.fullmatch(r"\[\d+\]:", t) for t in prompts), prompts
    before = figure_src(interact)

    select = interact.locator("select")
    if select.count():  # a Dropdown: choose another option
        assert select.first.locator("option").count() > 1
        select.first.select_option(index=1 if select.first.evaluate("e => e.selectedIndex") == 0 else 0)
    else:  # a slider: type a new value into its readout, as a reader would
        readout = interact.locator(".widget-readout").first
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("1")
        page.keyboard.press("Enter")
    page.wait_for_function("""([el, before]) => { const i = el.querySelector('.widget-output img');
                                                  return i && i.getAttribute('src') !== before; }""",
                           arg=[interact.element_handle(), before], timeout=120_000)
    after = figure_src(interact)
    assert after != before and after.startswith("data:image/png;base64,")

    # shut down cleanly, the page still open: the server stops its kernel and exits with 0, with no traceback
    req = urllib.request.Request(f"{lab['base']}/api/shutdown?token={lab['token']}", method="POST")
    urllib.request.urlopen(req, timeout=30)
    assert lab["proc"].wait(60) == 0, lab["log"].read_text()[-3000:]
    page.close()
    log = lab["log"].read_text()
    assert "Kernel shutdown" in log and "Traceback" not in log, log[-3000:]
