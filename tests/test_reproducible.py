"""Two quick runs of a chapter write identical measured values (issue: verdicts that hold up when the book is rerun).

`make test` runs every notebook once under nbdev_test with its results in $PAPERLAB_RESULTS; this test runs the
chosen chapters a second time through `paperlab reproduce`'s code path into another folder and compares every
measurement and interval bit for bit. Wall-clock claims (marked `timed`) are left out: they cannot repeat.
The chapters rerun here are those named in $PAPERLAB_REPRO_CHAPTERS (comma-separated; default: the cheapest one);
`make verify` reruns every chapter through nbval as well.
"""
import math
import os
from pathlib import Path

import pytest

from paperlab.cli import chapters, run_chapter
from paperlab.ledger import SMOKE, Ledger, check_ledgers

CHAPTERS = [c for c in os.environ.get("PAPERLAB_REPRO_CHAPTERS", "unitta").split(",") if c]


def _same(a, b) -> bool:
    "Equal, with NaN equal to NaN (a NaN measurement must repeat as NaN)."
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b): return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_two_quick_runs_write_identical_measurements(chapter, tmp_path):
    first_path = Path(os.environ.get("PAPERLAB_RESULTS", "results")) / chapter / "claims.json"
    if not first_path.exists():   # no earlier run to compare with (pytest outside make test): make one
        run_chapter(chapter, chapters()[chapter], mode="quick", results=first_path.parent.parent, progress=False)
    first = Ledger.load(first_path)
    run_chapter(chapter, chapters()[chapter], mode="quick", results=tmp_path, progress=False)
    second = Ledger.load(tmp_path / chapter / "claims.json")
    a, b = first.measured_values(), second.measured_values()
    assert a.keys() == b.keys()
    differ = {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
    assert not differ, f"{chapter}: measurements that changed between two quick runs: {differ}"
    assert first.meta["machine"]["threads"] == second.meta["machine"]["threads"]
    # issue 22: a quick run is a smoke run. No experiment or timing of its claims.json carries a finding, the chapter
    # marks one headline, and the ledger its executed notebook displayed matches claims.json (`ledger --check`)
    findings = {c.id: c.verdict for c in second.claims.values() if c.evidence != "deterministic" and c.verdict != SMOKE}
    assert not findings, f"{chapter}: a quick run gave findings: {findings}"
    assert second.mode == "quick" and all(c.mode == "quick" for c in second.claims.values())
    assert second.headline() is not None, f"{chapter}: no headline claim"
    assert check_ledgers(tmp_path) == []
