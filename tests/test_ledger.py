"""Property tests of the ledger's verdict rules (issue 22): intervals stay in their quantity's range, quick runs give
no findings, a passing control makes a claim vacuous, and a directional experiment without a control is refused.
Timings (issue 26.4): a margin band around the threshold gives "no measurable difference", two overlapping intervals
never give two different decided verdicts, and a fixed pair of functions timed twice gets the same verdicts."""
import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from paperlab.core import compare_speed
from paperlab.ledger import (NO_DIFFERENCE, PASSING, SMOKE, TIMING_MARGIN, Claim, Control, Ledger, above, below,
                             bootstrap_interval, paired_difference, timing_band, wilson_interval)

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
share = st.floats(0, 1, allow_nan=False)
NC = dict(no_control_because="a property test")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_stays_in_unit_range(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(share, min_size=2, max_size=8))
def test_bootstrap_of_shares_stays_in_their_range(values):
    lo, hi = bootstrap_interval(values, n_boot=300)
    assert min(values) <= lo <= hi <= max(values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(share, share), min_size=2, max_size=8))
def test_paired_difference_of_shares_stays_in_its_range(pairs):
    a, b = zip(*pairs)
    p = paired_difference(a, b, bounds=(-1, 1))
    assert -1 <= p.lo <= p.mean <= p.hi <= 1


@settings(max_examples=200, deadline=None)
@given(finite, finite, finite, st.sampled_from([above, below]))
def test_quick_mode_never_gives_a_finding_for_an_experiment(m, a, b, rule):
    lo, hi = sorted((a, b))
    c = Claim("x", "x", None, "", m, rule(0.0), interval=(lo, hi), mode="quick", **NC)
    assert c.verdict == SMOKE


@settings(max_examples=200, deadline=None)
@given(finite, finite, finite, finite, st.sampled_from([above, below]))
def test_a_passing_control_makes_a_passing_claim_vacuous(m, a, b, cm, rule):
    lo, hi = sorted((a, b))
    r = rule(0.0)
    control = Control("untrained", cm)
    c = Claim("x", "x", None, "", m, r, interval=(lo, hi), control=control)
    plain = Claim("x", "x", None, "", m, r, interval=(lo, hi), **NC)
    if plain.verdict in PASSING and control.passes(r, None):
        assert c.verdict == "vacuous"
    else:
        assert c.verdict == plain.verdict


@settings(max_examples=100, deadline=None)
@given(finite, st.sampled_from([above, below]))
def test_no_direction_without_a_spread(m, rule):
    assert Claim("x", "x", None, "", m, rule(0.0), **NC).verdict == "inconclusive"
    assert Claim("x", "x", None, "", m, rule(0.0), interval=(m, m), **NC).verdict == "inconclusive"


def test_directional_experiment_needs_a_control():
    with pytest.raises(ValueError, match="names a control"):
        Claim("x", "x", None, "", 0.5, above(0), interval=(0.1, 0.9))
    led = Ledger("t", mode="full")
    with pytest.raises(ValueError, match="names a control"):
        led.paired("x", "x", None, "pp", [1.0, 2.0], [0.0, 0.5])


def test_a_quick_ledger_writes_no_finding(tmp_path):
    led = Ledger("t", mode="quick")
    led.paired("x", "x", None, "pp", [1.0, 2.0, 1.5], [0.0, 0.5, 0.2], no_control_because="test")
    led.claim("p", "params", 6.5, "M", 6.5, above(6), evidence="deterministic")
    back = Ledger.load(led.save(tmp_path / "claims.json"))
    assert back["x"].verdict == SMOKE and back["p"].verdict == "reproduced"
    assert math.isclose(back["x"].measured, led["x"].measured)


def _executed(folder, ledger):
    "A stand-in for an executed chapter notebook whose last cell displayed `ledger`."
    import json
    nb = {"cells": [{"cell_type": "code", "source": "ledger", "outputs": [
        {"output_type": "execute_result", "data": {"text/markdown": ledger._repr_markdown_()}}]}]}
    (folder / f"{ledger.chapter}.ipynb").write_text(json.dumps(nb))


def test_cli_ledger_check_catches_consistent_tampering(tmp_path, capsys):
    import json
    from paperlab.cli import main
    led = Ledger("toy", mode="full")
    led.paired("gain", "the method wins", 2.0, "pp", [2.0, 2.5, 2.2], [1.0, 1.2, 1.1], no_control_because="test")
    led.claim("flops", "fewer FLOPs", 2.0, "×", 1.7, above(1), evidence="deterministic")
    p = led.save(tmp_path / "toy" / "claims.json")
    _executed(tmp_path / "toy", led)
    assert main(["--results", str(tmp_path), "ledger", "--check"]) == 0
    raw = json.loads(p.read_text())
    gain = raw["claims"][0]
    gain.update(measured=-2.3, interval=[-3.0, -1.5], verdict="not reproduced", seeds_to_decide=None)
    raw["claims"][1]["rule"]["kind"] = "below"; raw["claims"][1]["verdict"] = "not reproduced"
    p.write_text(json.dumps(raw))
    Ledger.load(p)   # self-consistent: loads
    capsys.readouterr()
    assert main(["--results", str(tmp_path), "ledger", "--check"]) == 1
    out = capsys.readouterr().out
    assert "claim 'gain': measured is -2.3" in out and "claim 'flops': rule" in out and str(p) in out
    # mode edited from quick to full in the file alone: caught on load
    raw["meta"]["mode"] = "quick"
    p.write_text(json.dumps(raw))
    assert main(["--results", str(tmp_path), "ledger", "--check"]) == 1
    assert "measured in full mode" in capsys.readouterr().out


# --- timings: a margin around the threshold (issue 26.4) -----------------------------------------------------------

ratio = st.floats(0.05, 20, allow_nan=False)
DECIDED = {"direction reproduced", "not reproduced", NO_DIFFERENCE}


def timing(lo: float, hi: float, rule, **kw) -> Claim:
    "A full-mode timing claim with the 95% interval [lo, hi]."
    return Claim("t", "faster", None, "×", (lo + hi) / 2, rule, interval=(lo, hi), timed=True, **{"mode": "full", **kw})


@settings(max_examples=300, deadline=None)
@given(ratio, ratio, st.sampled_from([above, below]), st.sampled_from([0.5, 1.0, 1 / 1.5, 3.0]))
def test_a_timing_verdict_follows_the_band(a, b, rule, t):
    lo, hi = sorted((a, b))
    band_lo, band_hi = t / (1 + TIMING_MARGIN), t * (1 + TIMING_MARGIN)   # closed form of the band
    v = timing(lo, hi, rule(t)).verdict
    if lo == hi: expect = "inconclusive"
    elif band_lo <= lo and hi <= band_hi: expect = NO_DIFFERENCE
    elif lo > band_hi: expect = "direction reproduced" if rule is above else "not reproduced"
    elif hi < band_lo: expect = "not reproduced" if rule is above else "direction reproduced"
    else: expect = "inconclusive"
    assert v == expect, (lo, hi, t, v)
    assert timing(lo, hi, rule(t), mode="quick").verdict == SMOKE


@settings(max_examples=500, deadline=None)
@given(ratio, ratio, ratio, ratio, st.sampled_from([above, below]))
def test_overlapping_timings_never_give_two_different_decided_verdicts(a, b, c, d, rule):
    "Two runs of one ratio (their intervals overlap) differ at most by one of them being inconclusive."
    (lo1, hi1), (lo2, hi2) = sorted((a, b)), sorted((c, d))
    if max(lo1, lo2) > min(hi1, hi2): return        # disjoint: two different ratios
    v1, v2 = timing(lo1, hi1, rule(1.0)).verdict, timing(lo2, hi2, rule(1.0)).verdict
    assert not (v1 in DECIDED and v2 in DECIDED and v1 != v2), ((lo1, hi1, v1), (lo2, hi2, v2))


def test_enat_runs_that_flipped_are_both_inconclusive_with_the_margin():
    # ENAT's efficiency:speed-toy in two runs on one machine (issue 26.4): 0.955 [0.94, 1.01] and 0.874 [0.82, 0.96]
    runs = [(0.94, 1.01), (0.82, 0.96)]
    assert [timing(*iv, above(1.0), margin=0).verdict for iv in runs] == ["inconclusive", "not reproduced"]
    assert [timing(*iv, above(1.0)).verdict for iv in runs] == ["inconclusive", "inconclusive"]
    assert timing_band(1.0, 0.05) == (1 / 1.05, 1.05)


def test_the_margin_is_stored_checked_and_stated(tmp_path, capsys):
    from paperlab.cli import main
    led = Ledger("toy", mode="full")
    c = led.claim("efficiency:x", "faster", None, "×", 1.0, above(1.0), interval=(0.97, 1.03), timed=True)
    assert (c.margin, c.verdict) == (TIMING_MARGIN, NO_DIFFERENCE)
    assert "±5 %" in c.rule_text() and "no measurable difference (margin ±5 %)" in led.to_markdown()
    p = led.save(tmp_path / "toy" / "claims.json")
    _executed(tmp_path / "toy", led)
    assert Ledger.load(p)["efficiency:x"].margin == TIMING_MARGIN
    assert main(["--results", str(tmp_path), "ledger", "--check"]) == 0
    raw = json.loads(p.read_text())
    raw["claims"][0].update(margin=0.01, verdict="inconclusive",   # a narrower margin, its verdict and reason to match
                            why="the interval straddles an edge of the ±1 % band around 1 ([0.9901, 1.01]), inside which "
                                "a timing is no measurable difference")
    p.write_text(json.dumps(raw))
    Ledger.load(p)   # self-consistent: loads
    capsys.readouterr()
    assert main(["--results", str(tmp_path), "ledger", "--check"]) == 1
    assert "claim 'efficiency:x': margin is 0.01 in claims.json but 0.05" in capsys.readouterr().out
    raw["claims"][0]["verdict"] = NO_DIFFERENCE            # the stored verdict must match the stored margin
    p.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="contradicts"):
        Ledger.load(p)


def _work(n: int) -> int:
    "n multiply-adds in pure Python: a fixed amount of work, whose time grows with n."
    s = 0
    for i in range(n): s += i * i
    return s


def _timed_claims() -> Ledger:
    """The timed claims of a tiny chapter: half the work against all of it (a known ratio of 2) and the same work
    against itself (a ratio of 1). Short calls, many interleaved repeats: what a verdict that holds on a rerun needs."""
    n, repeats = 5000, 200
    led = Ledger("rerun", mode="full")
    led.speed("half-the-work", "half the work is faster", 2.0,
              compare_speed(lambda: _work(2 * n), lambda: _work(n), repeats=repeats, warmup=5))
    led.speed("same-work", "the same work is no faster", 1.0,
              compare_speed(lambda: _work(n), lambda: _work(n), repeats=repeats, warmup=5))
    return led


def test_timing_verdicts_hold_on_a_rerun():
    runs = [_timed_claims(), _timed_claims()]
    seen = [{k: (c.verdict, round(c.measured, 3), tuple(round(x, 3) for x in c.interval)) for k, c in led.claims.items()}
            for led in runs]
    assert [{k: v[0] for k, v in s.items()} for s in seen] == [
        {"half-the-work": "direction reproduced", "same-work": NO_DIFFERENCE}] * 2, seen
    # the measured ratio is the known one: twice the loop takes about twice the time
    assert all(1.7 < led["half-the-work"].measured < 2.4 for led in runs), seen
