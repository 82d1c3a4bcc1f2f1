"""Property tests of the ledger's verdict rules (issue 22): intervals stay in their quantity's range, quick runs give
no findings, a passing control makes a claim vacuous, and a directional experiment without a control is refused."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from paperlab.ledger import (PASSING, SMOKE, Claim, Control, Ledger, above, below, bootstrap_interval, paired_difference,
                             wilson_interval)

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
