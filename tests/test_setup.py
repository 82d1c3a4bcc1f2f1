"""Set-up files agree with each other, and the console script answers."""
import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]


def test_environment_yml_has_the_same_pins_as_settings_ini():
    pins = set(settings()["requirements"].split() + settings()["dev_requirements"].split())
    yml = set(re.findall(r"^\s+- ([A-Za-z0-9_.\-]+==[^\s]+)$", (ROOT / "environment.yml").read_text(), re.M))
    assert yml == pins
    assert "python=" + settings()["min_python"] in (ROOT / "environment.yml").read_text()


def test_mamba_ssm_is_installed_by_the_makefile_and_documented_for_conda():
    s = settings()
    pins, build = s["mamba_pins"].split(), s["mamba_build"].split()
    assert pins == ["mamba-ssm==2.3.2.post1"] and all("==" in p for p in build)
    make = (ROOT / "Makefile").read_text()
    assert "--no-build-isolation $(MAMBA_PINS)" in make and "MAMBA_SKIP_CUDA_BUILD=TRUE" in make
    yml = (ROOT / "environment.yml").read_text()
    assert f"--no-build-isolation {pins[0]}" in yml and " ".join(build) in yml


def test_torch_pair_is_pinned_once_and_consistently():
    s = settings()
    assert set(s["torch_pins"].split()) <= set(s["requirements"].split())
    assert all("==" in p for p in s["requirements"].split() + s["dev_requirements"].split())


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def paperlab(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "paperlab"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_list_names_the_chapters():
    r = paperlab("list")
    assert r.returncode == 0, r.stderr
    assert "inline" in r.stdout and "10_inline.ipynb" in r.stdout


def test_cli_rejects_unknown_chapter_and_mode():
    r = paperlab("reproduce", "inlnie")
    assert r.returncode == 2 and "unknown chapter" in r.stderr
    r = paperlab("reproduce", "inline", "--mode", "fast")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = paperlab("reproduce")
    assert r.returncode == 2 and "--all" in r.stderr


def sanitize(text: str) -> str:
    "`text` as nbval sees it after tests/nbval_sanitize.cfg (nbval's own parser, patterns applied in file order)."
    from nbval.plugin import get_sanitize_patterns
    for regex, replace in get_sanitize_patterns((ROOT / "tests" / "nbval_sanitize.cfg").read_text()):
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize("a, b", [
    ("test accuracy 0.964 in 1.78 s\n", "test accuracy 0.964 in 12.05 s\n"),
    ("| speed | faster | 2 × | ⏱ 1.412 × | direction reproduced |", "| speed | faster | 2 × | ⏱ 0.98 × | direction reproduced |"),
    ("took 35 ms, then 1.2e-3 s", "took 41 ms, then 9e-4 s"),
    ("epoch 1/3: 100%|██████████| 4/4 [00:01<00:00,  3.10it/s]", "epoch 1/3: 100%|██████████| 4/4 [00:02<00:00,  1.52s/it]"),
    ("<Module object at 0x7f3a2c1d0e50>", "<Module object at 0x7f11a0b2c3d8>"),
    ("wrote /tmp/tmpe4r5v0ub/R.md", "wrote /tmp/tmpq81xz0a2/R.md"),
    ("saved to /work/main/results/.staging-inline-123/inline/fig.png", "saved to /tmp/ci/p/_build/quick/inline/fig.png"),
    ("written 2026-11-27T07:12:30", "written 2026-11-28T19:02:11"),
    # a wall-clock claim: its interval and the verdict computed from it move with the machine's load
    ("| speed | 2 × | ⏱ 1.4 × [1.2, 1.6] | direction reproduced | Fig. 5 |", "| speed | 2 × | ⏱ 1.1 × [0.9, 1.3] | inconclusive | Fig. 5 |"),
    ("measured ⏱ 2.88× faster (12.1 → 4.2 ms)", "measured ⏱ 2.51× faster (13.0 → 5.2 ms)"),
    # the timing verdicts of issue 26.4, with their margin, in a ledger, the efficiency table and the headline table
    ("| speed | 2 × | ⏱ 1.02 × [0.97, 1.04] | no measurable difference (margin ±5 %) | Fig. 5 |",
     "| speed | 2 × | ⏱ 1.1 × [1.06, 1.3] | direction reproduced (margin ±5 %) | Fig. 5 |"),
    ("| enat | faster | — | ⏱ 0.955× [0.94, 1.01] | 2.1× | ⏱ 0.45 | inconclusive | 1 | EPYC | full |",
     "| enat | faster | — | ⏱ 0.874× [0.82, 0.96] | 2.1× | ⏱ 0.42 | no measurable difference | 1 | EPYC | full |"),
    ("| dydit | faster | ⏱ 1.5 × [1.2, 1.7] | none: a timing | sanity check passed (margin ±5 %) | — | full |",
     "| dydit | faster | ⏱ 0.5 × [0.4, 0.6] | none: a timing | sanity check failed (margin ±5 %) | — | full |"),
    # a saved progress bar holds its final state, a rerun shows the bar as first displayed (issue 25)
    ("steps:   0%|          | 0/4 [00:00<?, ?it/s]", "steps: 100%|██████████| 4/4 [00:01<00:00,  3.10it/s]"),
    ("stops:   0%|          | 0/4 [00:00<?, ?it/s]", "stops:  50%|█████     | 2/4 [00:00<00:00, 87.87it/s]"),
    ("  0%|          | 0/5 [00:00<?, ?cell/s, loss=0.5]", "100%|██████████| 5/5 [00:00<00:00, 458.26cell/s, loss=0.5]"),
    ("nototal: 0it [00:00, ?it/s]", "nototal: 7it [00:00, 720.46it/s]"),
])
def test_nbval_sanitize_masks_times_paths_and_addresses(a, b):
    assert a != b and sanitize(a) == sanitize(b)


@pytest.mark.parametrize("a, b", [
    ("test accuracy 0.964 in 1.78 s\n", "test accuracy 0.965 in 1.78 s\n"),  # a result, not a time
    ("| params | 6.5 M | 6.48 M | reproduced |", "| params | 6.5 M | 6.49 M | reproduced |"),
    ("| gain | 2 pp | 1.4 pp [0.2, 2.6] | direction reproduced |", "| gain | 2 pp | 1.4 pp [0.2, 2.6] | inconclusive |"),  # a verdict from seeds stays
    ("losses [1.166, 0.268, 0.171]", "losses [1.166, 0.268, 0.172]"),
    ("ratio 1/2 and 3/4 of 256 px", "ratio 1/2 and 3/4 of 128 px"),
    ("12 steps of 5 samples", "13 steps of 5 samples"),
    ("steps: 100%|██████████| 4/4 [00:01<00:00,  3.10it/s]", "steps: 100%|██████████| 4/5 [00:01<00:00,  3.10it/s]"),  # the total
    ("train: 100%|██████████| 4/4 [00:01<00:00,  3.10it/s]", "tune: 100%|██████████| 4/4 [00:01<00:00,  3.10it/s]"),
    # the cells between a timed value and its verdict: the arithmetic ratio, the control
    ("| ⏱ 2× [1.9, 2.1] | 4× | ⏱ 0.5 | direction reproduced |", "| ⏱ 2× [1.9, 2.1] | 3× | ⏱ 0.5 | direction reproduced |"),
    ("| ⏱ 1.5 × [1.2, 1.7] | untrained: 0.1 | inconclusive |", "| ⏱ 1.5 × [1.2, 1.7] | untrained: 0.2 | inconclusive |"),
])
def test_nbval_sanitize_keeps_results(a, b):
    assert sanitize(a) != sanitize(b)


def test_make_has_lab_and_verify_and_ci_runs_both():
    make = (ROOT / "Makefile").read_text()
    for target in ("lab:", "verify:", "nbval:", "browser:", "kernel:"):
        assert f"\n{target}" in make, target
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("\nmake test\n") < ci.index("\nmake verify\n") and "apt-get install -y -q chromium" in ci


NBVAL_CELLS = ["import torch\ntorch.manual_seed(0)\nprint(torch.randn(3).sum().item())",
               "import time\nt0 = time.time(); print(f'took {time.time() - t0:.4f} s at {hex(id(t0))} in {__import__(\"tempfile\").mkdtemp()}')",
               "import ipywidgets as w, matplotlib.pyplot as plt\n"
               "w.interactive(lambda k: plt.show(plt.plot(range(k))), k=w.IntSlider(2, 1, 5))"]


def nbval(nb_path: Path) -> subprocess.CompletedProcess:
    "`make nbval`'s pytest command on one executed notebook."
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "nbval_widgets",
                           "--rootdir", str(nb_path.parent), "--nbval", "--nbval-current-env",
                           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), str(nb_path)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_nbval_rerun_passes_on_a_rerun_and_fails_on_a_changed_result(tmp_path):
    "A seeded result, a time, an address, a temp path and a widget rerun equal; a changed number does not."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NBVAL_CELLS])
    NotebookClient(nb, kernel_name="python3").execute()  # as `paperlab reproduce` runs a chapter
    nbformat.write(nb, tmp_path / "ok.ipynb")
    r = nbval(tmp_path / "ok.ipynb")
    assert r.returncode == 0, r.stdout[-3000:]
    nb.cells[0].outputs[0]["text"] = nb.cells[0].outputs[0]["text"].replace(".", ".9", 1)  # the seeded value changes
    nbformat.write(nb, tmp_path / "changed.ipynb")
    r = nbval(tmp_path / "changed.ipynb")
    assert r.returncode == 1 and "changed.ipynb::Cell 0" in r.stdout and "1 failed, 2 passed" in r.stdout, r.stdout[-3000:]
