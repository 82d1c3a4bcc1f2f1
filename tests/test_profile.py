"Tests of `paperlab.core.profile_ops`: the per-operator profile that the efficiency sections print."
import re

import pytest
import torch

from paperlab.core import profile_ops, profile_table

A, B = torch.randn(2, 384, 384, generator=torch.Generator().manual_seed(0)).unbind(0)
X, Y = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1)).unbind(0)


def big_matmul(a, b, x, y): return a @ b          # 2·384³ ≈ 113 MFLOP: aten::mm dominates
def small_add(a, b, x, y): return x + y           # 1000 additions: aten::add is (nearly) all there is


def test_dominating_operator_and_order():
    torch.set_num_threads(1)
    df = profile_ops({"matmul": big_matmul, "add": small_add}, A, B, X, Y, repeats=2, top=4)
    # the op the matmul spends its time in is aten::mm, far more than the add's aten::add; it leads the table
    assert df.operator.iloc[0] == "aten::mm"
    assert df.loc[1, "matmul ms"] > 10 * df.set_index("operator").loc["aten::add", "add ms"]
    assert df.loc[1, "matmul share"] > 80 and df.loc[1, "add ms"] == 0.0
    assert df.loc[1, "difference ms"] == pytest.approx(df.loc[1, "matmul ms"] - df.loc[1, "add ms"])
    assert list(df.index) == list(range(1, len(df) + 1)) and len(df) <= 4
    assert df["difference ms"].abs().is_monotonic_decreasing
    # shares are of each function's own total: the add spends nearly all of its self time in aten::add
    assert df.set_index("operator").loc["aten::add", "add share"] > 50
    assert "⏱ aten::mm" in df.attrs["reading"] and "add in aten::add" in df.attrs["reading"]


def test_swapped_order_flips_the_difference():
    df = profile_ops({"add": small_add, "matmul": big_matmul}, A, B, X, Y, repeats=1, top=2)
    assert df.operator.iloc[0] == "aten::mm" and df.loc[1, "difference ms"] < 0
    assert "⏱ aten::add" in df.attrs["reading"]


def test_table_hides_every_number_and_name_behind_the_stopwatch():
    df = profile_ops({"matmul": big_matmul, "add": small_add}, A, B, X, Y, repeats=1, top=3)
    lines = profile_table(df).splitlines()
    for line in lines[2:]:                         # header lines, then one per operator
        rank, rest = line.split(maxsplit=1)
        assert rank.isdigit() and rest.startswith("⏱")
        # sanitised as nbval does: from the first ⏱ to the end of the line
        assert re.sub(r"⏱[^|\n]*", "⏱ TIMED", line) == f"{rank} ⏱ TIMED" or re.sub(r"⏱[^|\n]*", "", line).strip() == rank


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"): profile_ops({})
    with pytest.raises(ValueError, match="repeats"): profile_ops({"f": small_add}, A, B, X, Y, repeats=0)


BIG_X, BIG_Y = torch.randn(2, 2_000_000, generator=torch.Generator().manual_seed(2)).unbind(0)


def test_excess_names_the_operator_the_arithmetic_ratio_misses():
    torch.set_num_threads(1)
    method = lambda a, b: (a @ b, BIG_X + BIG_Y)           # half the baseline's matmul MACs, plus a large add MACs do not count
    baseline = lambda a, b: (a @ b, b @ a)                  # arithmetic ratio (MACs): 2
    df = profile_ops({"method": method, "baseline": baseline}, A, B, repeats=2, top=3, arithmetic=2.0)
    assert df.operator.iloc[0] == "aten::add" and df["excess ms"].is_monotonic_decreasing
    assert (df["excess ms"] - (df["method ms"] - df["baseline ms"] / 2.0)).abs().max() < 1e-12
    assert "above the arithmetic ratio (2×) is in aten::add" in df.attrs["reading"]
