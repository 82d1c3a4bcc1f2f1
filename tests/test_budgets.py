"""The book's time budgets (issue 26.1): a chapter takes at most 60 s in quick mode and 6 minutes in full mode.

`paperlab reproduce` stores each run's wall time, its kernel's CPU time, its waits for the timing lock and its budget
(`results/<chapter>/timing.json`). The first test reads the stored full runs (`results/`, `$PAPERLAB_RESULTS`) and
fails when one is over its budget by more than 20 %; it skips when there is none. The others check it on fabricated
runs, and that a real run stores true times.
"""
import json
import os
import threading
import time
from pathlib import Path

import nbformat
import pytest

from paperlab import cli
from paperlab.ledger import timing_lock

ROOT = Path(__file__).resolve().parent.parent


def stored_roots() -> list[Path]:
    "The results folders that may hold stored runs: the checkout's results/ and $PAPERLAB_RESULTS."
    roots = [ROOT / "results"] + ([Path(os.environ["PAPERLAB_RESULTS"])] if os.environ.get("PAPERLAB_RESULTS") else [])
    return list({r.resolve(): r for r in roots if r.is_dir()}.values())


def full_runs_over_budget(roots: list[Path]) -> tuple[int, list[str]]:
    "How many stored full runs `roots` hold, and one line for each that is over its budget by more than the slack."
    full = {f"{root}/{name}": t for root in roots for name, t in cli.stored_times(root).items() if t["mode"] == "full"}
    return len(full), cli.over_budget(full)


def test_stored_full_runs_keep_their_budget():
    checked, problems = full_runs_over_budget(stored_roots())
    if not checked:
        pytest.skip(f"no stored full run in {[str(r) for r in stored_roots()] or 'results/'}: `make book` stores them")
    assert problems == [], "\n".join(problems)


def store(results: Path, name: str, mode: str, wall: float, waited: float = 0.0, cpu: float | None = None) -> Path:
    "A fabricated stored run of chapter `name`: its timing.json as `paperlab reproduce` writes it."
    (results / name).mkdir(parents=True, exist_ok=True)
    t = {"chapter": name, "mode": mode, "wall_s": wall, "cpu_s": wall if cpu is None else cpu, "lock_wait_s": waited,
         "budget_s": cli.BUDGET_S[mode], "finished": "2026-01-01T00:00:00"}
    path = results / name / "timing.json"
    path.write_text(json.dumps(t))
    return path


def test_a_full_run_over_its_budget_fails(tmp_path):
    # the budget: 6 minutes in full mode, 60 s in quick mode; a run may go over it by 20 % (432 s, 72 s)
    assert (cli.BUDGET_S, cli.BUDGET_SLACK) == ({"quick": 60, "full": 360}, 0.2)
    store(tmp_path, "slow", "full", 500.0)
    store(tmp_path, "fine", "full", 430.0)
    store(tmp_path, "waited", "full", 500.0, waited=100.0)     # 400 s of its own: the rest it waited for another's timing
    store(tmp_path, "quick", "quick", 80.0)
    checked, problems = full_runs_over_budget([tmp_path])
    assert checked == 3 and len(problems) == 1 and problems[0].startswith(f"{tmp_path}/slow: its full-mode run took 500.0 s")
    assert "over its budget of 360 s by 39%" in problems[0], problems
    assert [p.split(":")[0] for p in cli.over_budget(cli.stored_times(tmp_path))] == ["quick", "slow"]
    # a run known only from its executed notebook (stored before timing.json existed): its wall time counts
    (tmp_path / "old").mkdir()
    nbformat.write(nbformat.v4.new_notebook(metadata={"paperlab": {"mode": "full", "seconds": 3600.0, "chapter": "old"}}),
                   tmp_path / "old" / "10_old.ipynb")
    assert [p.split(":")[0] for p in full_runs_over_budget([tmp_path])[1]] == [f"{tmp_path}/old", f"{tmp_path}/slow"]


def test_paperlab_times_prints_the_budgets_and_checks_them(tmp_path, capsys):
    store(tmp_path, "fine", "full", 300.0, cpu=290.0)
    assert cli.main(["--results", str(tmp_path), "times", "--check"]) == 0
    out = capsys.readouterr().out
    assert "| fine | full | 300.0 | 290.0 | 0.0 | 360 | yes |" in out, out
    store(tmp_path, "slow", "full", 450.0)
    assert cli.main(["--results", str(tmp_path), "times", "--check"]) == 1
    out = capsys.readouterr().out
    assert "| slow | full | 450.0 | 450.0 | 0.0 | 360 | no: +25%, over the 20% slack |" in out and "1 run(s) over budget" in out
    assert cli.main(["--results", str(tmp_path), "times"]) == 0    # without --check it only prints
    (tmp_path / "bad").mkdir(); (tmp_path / "bad" / "timing.json").write_text("{}")
    assert cli.main(["--results", str(tmp_path), "times"]) == 2
    assert "bad/timing.json: a stored time names its mode" in capsys.readouterr().err


def test_a_run_stores_its_wall_cpu_and_lock_wait(tmp_path):
    """A chapter that burns 1 s of CPU, then waits about 1 s for the timing lock that the test holds: its stored CPU
    time is at least the 1 s its own clock counted, its wait at least the time the test kept the lock after it asked."""
    nbs, results, asked = tmp_path / "nbs", tmp_path / "results", tmp_path / "asked"
    nbs.mkdir(); results.mkdir()
    cells = ["import time\nt0 = time.process_time()\nwhile time.process_time() - t0 < 1.0: pass",
             f"import pathlib\nfrom paperlab.ledger import timing_lock\npathlib.Path({str(asked)!r}).touch()\n"
             "with timing_lock(): pass"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), nbs / "20_toy.ipynb")
    held = threading.Event()

    def hold():
        "Hold the results folder's timing lock until the kernel asks for it, then 1 s more."
        with timing_lock(results / ".timing.lock"):
            held.set()
            t0 = time.time()
            while not asked.exists() and time.time() - t0 < 120: time.sleep(0.02)
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start(); held.wait(10)
    try:
        out = cli.run_chapter("toy", nbs / "20_toy.ipynb", mode="quick", results=results, progress=False)
    finally:
        holder.join(130)
    t = json.loads((results / "toy" / "timing.json").read_text())
    assert (t["chapter"], t["mode"], t["budget_s"]) == ("toy", "quick", 60)
    assert t["cpu_s"] >= 1.0 and t["lock_wait_s"] >= 0.9 and t["wall_s"] >= t["cpu_s"] + t["lock_wait_s"] - 0.2, t
    meta = nbformat.read(out, as_version=4).metadata["paperlab"]
    assert (meta["seconds"], meta["cpu_seconds"], meta["lock_wait_seconds"], meta["budget_seconds"]) == (
        t["wall_s"], t["cpu_s"], t["lock_wait_s"], 60)
    assert cli.stored_times(results)["toy"]["wall_s"] == t["wall_s"]


def test_compare_speed_takes_the_timing_lock_under_reproduce(tmp_path, monkeypatch):
    "Under `paperlab reproduce` ($PAPERLAB_TIMING_LOCK set) compare_speed waits for another chapter's timed section."
    import fcntl
    import os
    import threading
    import time as _time
    from paperlab.core import compare_speed
    lock = tmp_path / ".timing.lock"
    monkeypatch.setenv("PAPERLAB_TIMING_LOCK", str(lock))
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(1.0, lambda: os.close(fd)).start()        # the other chapter's timed section ends after 1 s
    t0 = _time.perf_counter()
    compare_speed(lambda: None, lambda: None, repeats=2, warmup=0)
    assert _time.perf_counter() - t0 >= 0.9
    monkeypatch.delenv("PAPERLAB_TIMING_LOCK")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                             # held, but outside reproduce nobody waits for it
    try:
        t0 = _time.perf_counter()
        compare_speed(lambda: None, lambda: None, repeats=2, warmup=0)
        assert _time.perf_counter() - t0 < 0.5
    finally:
        os.close(fd)
