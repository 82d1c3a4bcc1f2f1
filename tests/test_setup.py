"""Set-up files agree with each other, and the console script answers."""
import configparser
import re
import subprocess
import sys
from pathlib import Path

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
