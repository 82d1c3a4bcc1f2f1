"""paperlab as a package (issue 24, point 4): the wheel ships the book's data/ and nbs/ and works from outside any
checkout; trained caches go to the user cache folder, keyed by their arguments, never into data/; a notebook run from a
second checkout writes into that checkout."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from paperlab.core import cache_dir, data_dir, repo_root

ROOT = Path(__file__).resolve().parent.parent


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from this checkout, installed with --no-deps into a fresh venv whose dependencies come from the
    project venv's site-packages (a path entry, so the editable install's own .pth of that folder is not read)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(ROOT)], check=True, cwd=tmp, capture_output=True)
    wheel = next((tmp / "dist").glob("paperlab-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "zz_paperlab_deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    work = tmp / "elsewhere"
    work.mkdir()
    return py, env_dir / "bin" / "paperlab", work


def _run(cmd, cwd, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("PAPERLAB_RESULTS", "PYTHONPATH")} | env
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=full, timeout=600)


def test_wheel_ships_data_and_notebooks_and_runs_outside_the_repo(installed, tmp_path):
    py, cli, work = installed
    code = ("import paperlab, paperlab.core as c, paperlab.inline as i, paperlab.unitta as u, paperlab.ostr_darts as o;"
            "import paperlab.smart as s;"
            "assert 'site-packages' in paperlab.__file__, paperlab.__file__;"
            "print(c.data_dir());"
            "print(sorted(i.paper_numbers())[:2]);"
            "print(len(o.load_benchmark()['genotypes']) if 'genotypes' in o.load_benchmark() else 'bench');"
            "print(u.paper_numbers() is not None);"
            "print(c.device_results('attention_cuda')['env']['card']);"
            "clip = s.pretrained_clip(); print(type(clip).__name__)")
    r = _run([py, "-c", code], work, PAPERLAB_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert "site-packages" in first and first.endswith(os.path.join("paperlab", "_book", "data")), first
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))  # the shipped CLIP was used
    assert not (work / "data").exists()                                                        # nothing written into cwd
    r = _run([cli, "list"], work)
    assert r.returncode == 0, r.stderr
    for chapter in ("inline", "mediators", "unitta", "smart"):
        assert chapter in r.stdout, r.stdout
    r = _run([cli, "reproduce", "nosuch"], work)
    assert r.returncode != 0 and "known chapters are" in r.stderr and "inline" in r.stderr, r.stderr


def test_digits_vq_cache_is_keyed_by_its_arguments_and_never_written_into_data(tmp_path, monkeypatch):
    from paperlab import enat
    monkeypatch.setenv("PAPERLAB_CACHE", str(tmp_path))
    before = _digest(data_dir())
    one_step = enat.digits_vq(steps=1, progress=False)
    assert list((tmp_path / "enat").glob("vq_digits-*.pt")), "the 1-step tokenizer goes to the cache folder"
    shipped = enat.digits_vq()
    ref = torch.load(data_dir("enat", "vq_digits.pt"), weights_only=True)
    for k, v in shipped.state_dict().items():
        assert torch.equal(v, ref[k].float()), k                      # the default is the shipped tokenizer, not the 1-step one
    assert any(not torch.equal(v, one_step.state_dict()[k]) for k, v in shipped.state_dict().items())
    again = enat.digits_vq(steps=1, progress=False)                  # read back from the cache: equal to what was stored
    for k, v in again.state_dict().items():
        assert torch.equal(v, one_step.state_dict()[k].half().float()), k
    assert _digest(data_dir()) == before
    with pytest.raises(ValueError, match="steps must be a positive int"):
        enat.digits_vq(steps=0)


def test_smart_caches_use_the_shipped_file_or_a_keyed_cache(tmp_path, monkeypatch):
    from paperlab import smart
    monkeypatch.setenv("PAPERLAB_CACHE", str(tmp_path))
    before = _digest(data_dir())
    calls = []

    def train():
        calls.append(1)
        return torch.nn.Linear(2, 2)
    build = lambda: torch.nn.Linear(2, 2)
    shipped, cache = smart._shipped_and_cache("clip_tiny", "not-the-shipped-key", None)
    assert shipped == data_dir("smart", "clip_tiny.npz") and cache.parent == tmp_path / "smart" and "not-the-shipped-key" in cache.name
    m1 = smart.cached_module(shipped, "not-the-shipped-key", build, train, cache=cache)
    m2 = smart.cached_module(shipped, "not-the-shipped-key", build, train, cache=cache)
    assert calls == [1] and cache.exists()                            # trained once, then read from the keyed cache
    assert torch.equal(m1.weight, m2.weight)
    assert _digest(data_dir()) == before                              # the shipped file is never overwritten
    smart.pretrained_clip()                                           # the shipped key matches: nothing is trained
    assert [p.name for p in (tmp_path / "smart").glob("clip_tiny-*.npz")] == [cache.name]


def test_a_second_checkout_writes_into_itself(tmp_path, monkeypatch):
    second = tmp_path / "second"
    (second / "paperlab").mkdir(parents=True)
    (second / "settings.ini").write_text("")
    (second / "nbs").mkdir()
    (second / "data").mkdir()
    monkeypatch.chdir(second / "nbs")
    monkeypatch.delenv("PAPERLAB_RESULTS", raising=False)
    from paperlab.core import results_dir
    assert repo_root() == second.resolve()
    assert results_dir("inline", create=False) == second.resolve() / "results" / "inline"
    assert data_dir() == second.resolve() / "data"


def test_cache_dir_defaults_to_the_user_cache_folder(monkeypatch):
    import platformdirs
    monkeypatch.delenv("PAPERLAB_CACHE", raising=False)
    assert cache_dir(create=False) == Path(platformdirs.user_cache_dir("paperlab"))
