"""The results store of `paperlab reproduce` never loses a result (issue 24 §1-2).

Fault injection on the folder swap (an interrupt between its two renames), two runs of one chapter at once, a quick
run over a full one, a run killed with SIGKILL, the modes of written files, and reading commands that create
nothing. The throwaway notebooks use the standard library only, so a kernel starts in a second or two. And the saved
notebook holds each progress bar's final state, not the 0 % it was first displayed with (issue 25).
"""
import contextlib
import ctypes
import errno
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from paperlab import cli, docs
from paperlab.core import SpeedComparison, atomic_write
from paperlab.ledger import Ledger

PAPERLAB = Path(sys.executable).parent / "paperlab"
NB = "20_toy.ipynb"


def tiny_nb(nbs: Path, cells: list[str]) -> Path:
    "Write the throwaway chapter `toy` (`nbs/20_toy.ipynb`) with these code cells."
    nbs.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), nbs / NB)
    return nbs / NB


def run(*argv) -> tuple[int, str, str]:
    "`paperlab *argv` in this process: exit status, stdout, stderr."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def write_out(text: str) -> str:
    "A cell that writes `text` (a Python expression) to `toy/out.txt` in the run's results folder."
    return ("import os, pathlib\nd = pathlib.Path(os.environ['PAPERLAB_RESULTS']) / 'toy'\n"
            f"d.mkdir(parents=True, exist_ok=True); (d / 'out.txt').write_text({text})")


def wait_cell(pidfile: Path, release: Path | None = None) -> str:
    "A cell that writes the kernel's pid to `pidfile`, then waits (at most 60 s) for `release` to exist."
    until = f"os.path.exists({str(release)!r})" if release else "False"
    return (f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
            f"t0 = time.time()\nwhile not {until} and time.time() - t0 < 60: time.sleep(0.05)")


def start_run(nbs: Path, results: Path, pidfile: Path) -> tuple[subprocess.Popen, int]:
    "Start `paperlab reproduce toy` in another process; return it and its kernel's pid once the waiting cell runs."
    proc = subprocess.Popen([str(PAPERLAB), "--nbs", str(nbs), "--results", str(results), "reproduce", "toy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not (pidfile.exists() and pidfile.read_text()):
        if proc.poll() is not None: pytest.fail(f"the first run ended early: {proc.communicate()}")
        if time.time() - t0 > 120: proc.kill(); pytest.fail("the first run's kernel did not start in 120 s")
        time.sleep(0.05)
    return proc, int(pidfile.read_text())


def kill_quietly(pid: int) -> None:
    "SIGKILL `pid` if it is still there."
    with contextlib.suppress(ProcessLookupError): os.kill(pid, signal.SIGKILL)


def tree(folder: Path) -> dict[str, bytes]:
    "Every file under `folder` with its bytes."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def exchange_supported(tmp: Path) -> bool:
    "Whether this system and file system swap two folders atomically (renameat2 with RENAME_EXCHANGE), probed directly."
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None: return False
    (tmp / "probe-a").mkdir(); (tmp / "probe-b").mkdir()
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    ok = fn(-100, bytes(tmp / "probe-a"), -100, bytes(tmp / "probe-b"), 2) == 0
    (tmp / "probe-a").rmdir(); (tmp / "probe-b").rmdir()
    return ok


@pytest.fixture(autouse=True)
def usual_umask(monkeypatch):
    "The usual umask 022 (so files are expected 0644, folders 0755), and no ledger folder from the environment."
    monkeypatch.delenv("PAPERLAB_LEDGERS", raising=False)
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def no_sphinx(monkeypatch):
    "Sphinx (and the highlighted source pages) stubbed out: a `docs build` stages the site and writes an index page."
    import sphinx.cmd.build
    monkeypatch.setattr(docs, "write_source_pages", lambda dest: [])

    def build_main(args):
        Path(args[-1]).mkdir(parents=True)
        (Path(args[-1]) / "index.html").write_text("site")
        return 0
    monkeypatch.setattr(sphinx.cmd.build, "build_main", build_main)


# --- the swap ------------------------------------------------------------------------------------------------------

def folders(tmp_path: Path) -> tuple[Path, Path]:
    "A chapter folder holding the old results and a staged folder holding the new ones."
    target, staged = tmp_path / "toy", tmp_path / ".staging-toy-1" / "toy"
    target.mkdir(); (target / "claims.json").write_text("old")
    staged.mkdir(parents=True); (staged / "claims.json").write_text("new")
    return target, staged


def test_interrupt_between_the_two_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    target, staged = folders(tmp_path)

    def no_exchange(a, b): raise OSError(errno.EINVAL, "no RENAME_EXCHANGE on this file system")
    monkeypatch.setattr(docs, "_exchange", no_exchange, raising=False)   # the two-rename path
    calls, real_replace = [], os.replace

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2: raise KeyboardInterrupt   # after `toy` -> `.toy.old`, before the staged folder moves in
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        cli._swap_in(staged, target)
    assert calls[:2] == [("toy", ".toy.old"), ("toy", "toy")]   # the interrupt came between the two renames
    assert (target / "claims.json").read_text() == "old"         # and the old results are back in place
    assert not (tmp_path / ".toy.old").exists()


def test_swap_never_leaves_the_folder_missing(tmp_path, monkeypatch):
    if not exchange_supported(tmp_path): pytest.skip("no renameat2(RENAME_EXCHANGE) here: the two-rename path is tested above")
    target, staged = folders(tmp_path)

    def replace(src, dst): raise AssertionError(f"rename {src} -> {dst}: the chapter folder would be missing for a moment")
    monkeypatch.setattr(os, "replace", replace)
    cli._swap_in(staged, target)
    assert (target / "claims.json").read_text() == "new"
    assert not staged.exists() and not (tmp_path / ".toy.old").exists()


def test_left_over_old_copy_is_read_and_then_recovered(tmp_path):
    "A run killed between the renames left `.toy.old` and no `toy`: readers show it, and the next run puts it back."
    nbs, results = tmp_path / "nbs", tmp_path / "results"
    Ledger("toy").save(results / ".toy.old" / "claims.json")
    before = (results / ".toy.old" / "claims.json").read_text()
    rc, out, err = run("--nbs", nbs, "--results", results, "ledger", "--format", "json")
    assert (rc, list(json.loads(out))) == (0, ["toy"]), err
    tiny_nb(nbs, ["raise RuntimeError('this run fails')"])
    rc, out, err = run("--nbs", nbs, "--results", results, "list")
    assert rc == 0 and "not run yet" not in out, out
    rc, _, err = run("--nbs", nbs, "--results", results, "reproduce", "toy")
    assert rc == 1 and "FAILED" in err
    assert (results / "toy" / "claims.json").read_text() == before   # recovered, though the new run failed
    assert not (results / ".toy.old").exists()


# --- two runs at once, and a killed run ------------------------------------------------------------------------------

def test_second_run_of_a_chapter_refuses_at_once_or_waits(tmp_path):
    nbs, results, pidfile, release = tmp_path / "nbs", tmp_path / "results", tmp_path / "kernel.pid", tmp_path / "release"
    tiny_nb(nbs, [write_out("str(os.getppid())"), wait_cell(pidfile, release)])   # out.txt: the pid of the run's process
    proc, kernel = start_run(nbs, results, pidfile)
    try:
        t0 = time.time()
        # --timeout: without a lock this second run would execute, and fail on the waiting cell in ~10 s, not wait 60 s
        rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy", "--timeout", "5")
        assert rc == 2, (rc, out, err)
        assert f"toy is being reproduced into {results} by pid {proc.pid}" in err and "--wait" in err
        assert "Traceback" not in err and time.time() - t0 < 5
        assert not list(results.glob(f".staging-toy-{os.getpid()}")) and not (results / "toy.failed.ipynb").exists()
        # --wait: blocks until the first run ends (released after a second), then runs
        threading.Timer(1.0, release.touch).start()
        rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy", "--wait")
        assert rc == 0, err
        assert f"waiting for pid {proc.pid}" in err
        out1, err1 = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "toy: ok" in out1, err1
        assert (results / "toy" / "out.txt").read_text() == str(os.getpid())   # the waiting run came second
    finally:
        kill_quietly(proc.pid); kill_quietly(kernel)


def test_run_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path):
    nbs, results, pidfile = tmp_path / "nbs", tmp_path / "results", tmp_path / "kernel.pid"
    tiny_nb(nbs, [write_out("'killed'"), wait_cell(pidfile)])
    proc, kernel = start_run(nbs, results, pidfile)
    stage = results / f".staging-toy-{proc.pid}"
    try:
        # the kernel's connection file lies in the staging folder (jupyter_client's default is /tmp/tmp*.json, left behind)
        assert (stage / "kernel.json").is_file()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_quietly(proc.pid); kill_quietly(kernel)   # the kernel would exit within ~1 s by itself (ipykernel's parent poller)
    assert stage.is_dir()                            # what SIGKILL leaves: no code of the run ran after it
    nbformat.write(nbformat.v4.new_notebook(), results / "toy.failed.ipynb")   # and a failure of an older run
    (results / ".toy.failed.ipynb.x1y2.tmp").write_text("half")             # half-written when a run was killed
    tiny_nb(nbs, [write_out("'rerun'")])
    rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy")
    assert rc == 0, err
    assert (results / "toy" / "out.txt").read_text() == "rerun"
    assert sorted(p.name for p in results.iterdir()) == [".lock-toy", "toy"]   # staging, failed notebook, temp file: gone


# --- quick over full, and file modes -----------------------------------------------------------------------------------

def test_quick_run_never_replaces_a_full_run_without_force(tmp_path):
    nbs, results = tmp_path / "nbs", tmp_path / "results"
    tiny_nb(nbs, [write_out("os.environ['PAPERLAB_MODE']")])
    full = nbformat.v4.new_notebook(metadata={"paperlab": {"mode": "full", "seconds": 3600.0, "chapter": "toy",
                                                           "finished": "2025-05-01T10:00:00"}})
    (results / "toy" / "figures").mkdir(parents=True)
    nbformat.write(full, results / "toy" / NB)
    (results / "toy" / "figures" / "loss.png").write_bytes(b"a figure of the full run")
    before = tree(results / "toy")
    rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy", "--mode", "quick")
    assert rc == 2, (out, err)
    assert "toy (full mode, 2025-05-01T10:00:00)" in err and "--force" in err and "Traceback" not in err
    assert tree(results / "toy") == before
    rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy", "--mode", "quick", "--force")
    assert rc == 0, err
    assert (results / "toy" / "out.txt").read_text() == "quick" and not (results / "toy" / "figures").exists()
    assert nbformat.read(results / "toy" / NB, as_version=4).metadata["paperlab"]["mode"] == "quick"
    # what a run writes is readable by others: files 0644, folders 0755 (umask 022); mkstemp's 0600 before
    modes = {str(p.relative_to(results)): stat.S_IMODE(p.stat().st_mode) for p in [results, *results.rglob("*")]}
    assert modes == {".": 0o755, ".lock-toy": 0o644, "toy": 0o755, "toy/out.txt": 0o644, f"toy/{NB}": 0o644,
                     "toy/timing.json": 0o644}, modes
    rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy", "--mode", "full")   # full over quick: fine
    assert rc == 0, err
    assert (results / "toy" / "out.txt").read_text() == "full"


def test_a_full_run_known_only_from_its_claims_is_protected_too(tmp_path):
    (tmp_path / "toy").mkdir()   # as a full-mode `nbdev_test` run of the chapter leaves it: claims.json, no executed notebook
    (tmp_path / "toy" / "claims.json").write_text(json.dumps({"chapter": "toy", "claims": [],
                                                              "meta": {"mode": "full", "written": "2025-05-01T10:00:00"}}))
    risk = cli.full_run_at_risk(tmp_path, "toy", Path(NB), "quick")
    assert (risk["mode"], risk["date"]) == ("full", "2025-05-01T10:00:00")
    assert cli.full_run_at_risk(tmp_path, "toy", Path(NB), "full") is None


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_gives(tmp_path, umask, mode):
    os.umask(umask)
    assert stat.S_IMODE(atomic_write(tmp_path / "claims.json", "{}").stat().st_mode) == mode


# --- readers ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["list"], ["ledger"], ["efficiency"], ["docs", "build"]])
def test_reading_commands_create_nothing(tmp_path, monkeypatch, no_sphinx, cmd):
    nbs = tmp_path / "nbs"
    tiny_nb(nbs, ["1"])
    if cmd[0] == "docs": cmd = cmd + ["--out", tmp_path / "site"]
    monkeypatch.setenv("PAPERLAB_RESULTS", str(tmp_path / "default"))
    rc, out, err = run("--nbs", nbs, *cmd)                                       # the default results folder
    assert rc == 0, err
    rc, out, err = run("--nbs", nbs, "--results", tmp_path / "named", *cmd)      # a named one
    assert rc == 0, err
    assert not (tmp_path / "default").exists() and not (tmp_path / "named").exists()


@pytest.mark.parametrize("cmd", [["list"], ["ledger"], ["efficiency"], ["docs", "build"], ["reproduce", "toy"]])
def test_results_path_that_is_a_file_is_a_one_line_error(tmp_path, no_sphinx, cmd):
    nbs, results = tmp_path / "nbs", tmp_path / "results.txt"
    tiny_nb(nbs, ["1"])
    results.write_text("not a folder")
    if cmd[0] == "docs": cmd = cmd + ["--out", tmp_path / "site"]
    rc, out, err = run("--nbs", nbs, "--results", results, *cmd)
    assert rc == 2, (out, err)
    assert err.startswith(f"paperlab: error: the results path {results} is not a folder") and len(err.strip().splitlines()) == 1, err
    rc, out, err = run("--nbs", nbs, "--results", results / "sub", *cmd)     # a path through a file
    assert rc == 2 and err.startswith(f"paperlab: error: cannot") and str(results / "sub") in err, err
    assert not (tmp_path / "site").exists() and results.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_results_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "results").mkdir(mode=0o000)
    try:
        rc, out, err = run("--nbs", tmp_path, "--results", tmp_path / "results", "list")
    finally:
        (tmp_path / "results").chmod(0o755)
    assert rc == 2 and err.startswith(f"paperlab: error: cannot read the results folder {tmp_path / 'results'}"), err


def test_docs_build_reads_the_default_results_folder(tmp_path, monkeypatch, no_sphinx):
    "`make book` runs `paperlab docs build --out _docs` without --results: the efficiency page must come from results/."
    nbs, results = tmp_path / "nbs", tmp_path / "results"
    tiny_nb(nbs, ["1"])
    led = Ledger("toy")
    led.speed("efficiency:toy", "twice as fast", 2.0, SpeedComparison([4.0, 4.1, 3.9], [2.0, 2.0, 2.0], threads=1), arithmetic=4.0)
    led.save(results / "toy" / "claims.json")
    monkeypatch.setenv("PAPERLAB_RESULTS", str(results))
    rc, out, err = run("--nbs", nbs, "docs", "build", "--out", tmp_path / "site")
    assert rc == 0, err
    page = (tmp_path / "_build" / "site_src" / "efficiency.md").read_text()
    assert "| toy | twice as fast |" in page, page


# --- progress bars in the saved notebook (issue 25) -------------------------------------------------------------------

BARS = ["from tqdm.auto import tqdm\nfor _ in tqdm(range(4), desc='steps'): pass",
        "bar = tqdm(total=4, desc='stops'); bar.update(2); bar.close()",            # stopped half-way
        "for _ in tqdm(range(3), desc='hidden', leave=False): pass",               # closed and hidden at the end
        "for _ in tqdm(range(5), unit='cell', postfix={'loss': 0.5}): pass",
        "for _ in tqdm(iter(range(7)), desc='no total'): pass",                    # no total: no bar, a count
        "import ipywidgets as w\nw.HBox([w.HTML('a'), w.FloatProgress(value=1, max=2), w.HTML('b')])"]   # not a tqdm bar


def test_saved_progress_bars_hold_their_final_state(tmp_path):
    from nbval.plugin import get_sanitize_patterns
    from tqdm import tqdm as text_bar   # the terminal's tqdm: the text each finished bar prints there
    nbs, results = tmp_path / "nbs", tmp_path / "results"
    tiny_nb(nbs, BARS)
    rc, out, err = run("--nbs", nbs, "--results", results, "reproduce", "toy")
    assert rc == 0, err
    saved = [c.outputs[0]["data"]["text/plain"] for c in nbformat.read(results / "toy" / NB, as_version=4).cells]
    expected = [text_bar.format_meter(4, 4, 0, prefix="steps"), text_bar.format_meter(2, 4, 0, prefix="stops"),
                text_bar.format_meter(3, 3, 0, prefix="hidden"), text_bar.format_meter(5, 5, 0, unit="cell"),
                text_bar.format_meter(7, None, 0, prefix="no total")]
    # the same bars, elapsed time and rate aside (they are of this run): 'steps: 100%|██████████| 4/4'
    assert [s.split(" [")[0] for s in saved[:5]] == [e.split(" [")[0] for e in expected], saved
    assert saved[0].startswith("steps: 100%|██████████| 4/4 [") and saved[1].startswith("stops:  50%|█████     | 2/4 [")
    assert saved[3].endswith("cell/s, loss=0.5]") and saved[5].startswith("HBox(children=(HTML(value='a')"), saved
    # what `make nbval` compares: the saved final state and a rerun's first display sanitise to the same text
    patterns = get_sanitize_patterns((Path(__file__).parent / "nbval_sanitize.cfg").read_text())
    def sanitize(text):
        for regex, replace in patterns: text = re.sub(regex, replace, text)
        return text
    first = [text_bar.format_meter(0, 4, 0, prefix="steps"), text_bar.format_meter(0, 4, 0, prefix="stops"),
             text_bar.format_meter(0, 3, 0, prefix="hidden"), text_bar.format_meter(0, 5, 0, unit="cell", postfix="loss=0.5"),
             text_bar.format_meter(0, None, 0, prefix="no total")]
    assert [sanitize(s) for s in saved[:5]] == [sanitize(f) for f in first], (saved, first)


def test_settle_progress_bars_needs_the_stored_widget_state():
    "Without nbclient's widget state (a notebook executed with store_widget_state=False) nothing is rewritten."
    shown = "steps:   0%|          | 0/4 [00:00<?, ?it/s]"
    out = nbformat.v4.new_output("display_data", data={"text/plain": shown,
                                                       "application/vnd.jupyter.widget-view+json": {"model_id": "abc"}})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("", outputs=[out])])
    assert cli.settle_progress_bars(nb) == 0 and nb.cells[0].outputs[0]["data"]["text/plain"] == shown
