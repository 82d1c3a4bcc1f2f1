"""What the prose says against what the cells print.

1. A sentence that says "whole", "all", "every", "always" (or "never", "none", "nothing") next to a number, or about a row
   of the table printed just above it, must not contradict that number: "all"/"every"/"whole" with a share below 100 %,
   "never"/"none" with a share or a count above 0. The check reads the chapters' markdown cells (nbs/) and, when
   PAPERLAB_RESULTS names a folder of executed runs (`make verify`'s quick runs), every markdown cell and Markdown output
   against the tables that the code cells before it printed. It is a regex over sentences: it catches a caption written
   once and left behind by the run (MEEPO's receptive-field caption said "the bidirectional and strided scans reach the
   whole room" above a table with 30.74 % of the points reached), not every way prose can be wrong.

2. Every timing and speed ratio that a chapter prints goes through one formatter (`paperlab.core.timed`, `fmt_seconds`,
   `fmt_number`, `timed_frame`, or `SpeedComparison.describe`), so it reads `60.0 ms`, not `6.000e-02`: an f-string
   format spec applied to a timing name (`*_ms`, `*_s`, `seconds`, `.ratio`, `speed*`, `latency`) is flagged, except the
   listed ones, each with its reason.
"""
from __future__ import annotations

import ast
import html
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent

# --- 1. quantifiers against numbers ---------------------------------------------------------------------------------

UNIVERSAL = {"all", "every", "whole", "entire", "always", "everywhere", "everything"}
NEGATIVE = {"never", "none", "nothing", "nowhere"}
WINDOW = 4                         # words from a quantifier to a number that it is read with
COUNT_NOUNS = r"(times?|cases?|points?|questions?|samples?|seeds?|tokens?|errors?|failures?|runs?|images?|boards?|rooms?|steps?)"
PERCENT = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s?(?:%|percent\b)")
COUNT = re.compile(rf"(?<![\w.,])(\d[\d,]*)\s+(?:\w+\s+)?{COUNT_NOUNS}\b", re.I)


def plain(text: str) -> str:
    "Markdown reduced to its words: math, code, links' targets, emphasis and HTML tags removed."
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", " ", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return re.sub(r"[*_]{1,3}(?=\S)|(?<=\S)[*_]{1,3}", "", text)


def clauses(text: str) -> list[str]:
    "Sentences and their clauses (split at . ! ? ; and at line breaks of lists and tables)."
    parts = re.split(r"(?<=[.!?;:])\s+(?=[A-Z(])|;\s+|\n\s*\n|\n\s*[-|*]\s+|\n(?=\|)", plain(text))
    return [" ".join(p.split()) for p in parts if p.strip()]


def _words(clause: str) -> list[str]:
    return re.findall(r"[\w.%,-]+", clause.lower())


def _quantifiers(clause: str) -> list[tuple[int, str, str]]:
    "(word position, word, 'all' or 'none') of each quantifier in the clause ('all but', 'not all', 'at all' are not)."
    words, out = _words(clause), []
    for i, w in enumerate(words):
        w = w.strip(".,")
        nxt, prev = (words[i + 1] if i + 1 < len(words) else ""), (words[i - 1] if i else "")
        if w in UNIVERSAL and nxt != "but" and prev not in ("not", "at", "almost", "nearly"):
            out.append((i, w, "all"))
        elif w in NEGATIVE and prev != "almost":
            out.append((i, w, "none"))
    return out


THRESHOLD = re.compile(r"(above|below|over|under|within|least|most|than|about|around|to|from|[<>≤≥~±])$", re.I)


def in_clause_contradictions(clause: str) -> list[str]:
    "A quantifier followed within WINDOW words by a share (or, for 'never'/'none', a count) that contradicts it; a bound ('above 90 %') or a confidence level is not a share."
    found = []
    spans = [m.start() for m in re.finditer(r"[\w.%,-]+", clause.lower())]
    def word_at(pos: int) -> int: return sum(1 for p in spans if p <= pos) - 1
    for qi, q, kind in _quantifiers(clause):
        for m in PERCENT.finditer(clause):
            before = clause[:m.start()].split()
            after = clause[m.end():].lstrip().lower()
            if not 0 < word_at(m.start()) - qi <= WINDOW: continue
            if (before and THRESHOLD.search(before[-1])) or after.startswith(("ci", "interval", "confidence")): continue
            v = float(m.group(1))
            if (kind == "all" and v < 100) or (kind == "none" and v > 0):
                found.append(f"'{q}' with {m.group(0).strip()}: {clause[:160]}")
        if kind == "none":
            for m in COUNT.finditer(clause):
                before = clause[:m.start()].lower().split()[-2:]
                if not 0 < word_at(m.start()) - qi <= WINDOW or "of" in before or "out" in before: continue
                if int(m.group(1).replace(",", "")) > 0:
                    found.append(f"'{q}' with {m.group(0).strip()}: {clause[:160]}")
    return found


def _cells_of(line: str) -> list[str]:
    return [c for c in re.split(r"\s{2,}", line.strip()) if c]


def printed_tables(text: str) -> list[dict[str, dict[str, float]]]:
    "Tables in printed text (pandas' to_string, Markdown pipe tables): {row label: {column: value}} for numeric cells."
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            head = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = {}
            for row in lines[i + 2:]:
                if not row.strip().startswith("|"): break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                rows[cells[0]] = {h: float(v) for h, v in zip(head[1:], cells[1:]) if re.fullmatch(r"-?\d+(\.\d+)?", v)}
            tables.append(rows)
        elif "%" in line and not line.strip().startswith("|"):
            head = _cells_of(line)
            rows = {}
            for row in lines[i + 1:]:
                cells = _cells_of(row)
                if len(cells) != len(head) + 1: break
                rows[cells[0]] = {h: float(v) for h, v in zip(head, cells[1:]) if re.fullmatch(r"-?\d+(\.\d+)?", v)}
            if rows: tables.append(rows)
    return tables


def html_tables(text: str) -> list[dict[str, dict[str, float]]]:
    "Tables of a text/html output (pandas' to_html): {row label: {column: value}}."
    tables = []
    for t in re.findall(r"<table.*?</table>", text, re.S):
        rows = [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)]
                for r in re.findall(r"<tr.*?</tr>", t, re.S)]
        if len(rows) < 2: continue
        head, out = rows[0], {}
        for r in rows[1:]:
            if len(r) == len(head) and r:
                out[r[0]] = {h: float(v) for h, v in zip(head[1:], r[1:]) if re.fullmatch(r"-?\d+(\.\d+)?", v)}
        tables.append(out)
    return tables


def output_text(o) -> tuple[str, str]:
    "(plain text, html) of an output."
    if o.get("output_type") == "stream": return o.get("text", ""), ""
    d = o.get("data", {})
    return d.get("text/markdown") or d.get("text/plain", ""), d.get("text/html", "")


def _label_word(label: str) -> str | None:
    "The word that names a table row in prose: its first word of four letters or more."
    m = re.search(r"[A-Za-z][A-Za-z-]{3,}", label)
    return m.group(0).lower() if m else None


def table_contradictions(clause: str, tables: list[dict[str, dict[str, float]]]) -> list[str]:
    "A quantifier in `clause` about a row that a table above names, whose share column (%) says otherwise."
    quants = _quantifiers(clause)
    if not quants: return []
    words = {w.strip(".,") for w in _words(clause)}
    found = []
    for table in tables:
        for label, cols in table.items():
            word = _label_word(label)
            if not word or word not in words: continue
            for col, v in cols.items():
                if "%" not in col: continue
                for _, q, kind in quants:
                    if (kind == "all" and v < 100) or (kind == "none" and v > 0):
                        found.append(f"'{q}' about {label!r}, whose {col!r} is {v:g}: {clause[:160]}")
    return found


def notebook_contradictions(nb, look_back: int = 2) -> list[str]:
    "Every contradiction in a notebook: quantifiers against numbers in the same clause, and captions against the tables printed by the `look_back` code cells before them."
    found, recent = [], []           # recent: tables printed by the last code cells
    for i, cell in enumerate(nb.cells):
        texts = [cell.source] if cell.cell_type == "markdown" else []
        if cell.cell_type == "code":
            tables = []
            for o in cell.get("outputs", []):
                text, htm = output_text(o)
                if o.get("data", {}).get("text/markdown"): texts.append(text)
                tables += printed_tables(text) + html_tables(htm)
            recent = (recent + [tables])[-look_back:]
        for t in texts:
            for c in clauses(t):
                found += [f"cell {i}: {f}" for f in in_clause_contradictions(c)]
                found += [f"cell {i}: {f}" for f in table_contradictions(c, [t for ts in recent for t in ts])]
    return found


def chapter_notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


# MEEPO's receptive-field caption as it was, under the table its run printed (the example of issue 25)
OLD_MEEPO_TABLE = """                        points reached (%)  gradient-weighted distance (m)
window attention (128)                8.08                            0.74
causal Mamba                         19.38                            0.07
bidirectional                        30.74                            0.09
strided bi n=8                       93.69                            0.10
"""
OLD_MEEPO_CAPTION = """*The red star is the chosen point. Attention reaches exactly its patch; the causal scan reaches only earlier points of
the curve; the bidirectional and strided scans reach the whole room, with gradients decaying along the curve.*

## 9. Cost scaling"""


def _toy_run(caption: str, table: str):
    code = nbformat.v4.new_code_cell("print(erf_stats)", outputs=[nbformat.v4.new_output("stream", name="stdout", text=table)])
    return nbformat.v4.new_notebook(cells=[code, nbformat.v4.new_markdown_cell(caption)])


def test_the_old_meepo_caption_is_caught():
    found = notebook_contradictions(_toy_run(OLD_MEEPO_CAPTION, OLD_MEEPO_TABLE))
    assert any("'bidirectional'" in f and "30.74" in f for f in found), found
    assert any("'strided bi n=8'" in f and "93.69" in f for f in found), found
    # the same caption above a table where every point is reached says nothing wrong
    full = OLD_MEEPO_TABLE.replace("30.74", "100.0").replace("93.69", "100.0").replace("19.38", "100.0").replace("8.08", "100.0")
    assert notebook_contradictions(_toy_run(OLD_MEEPO_CAPTION, full)) == []


@pytest.mark.parametrize("sentence, wrong", [
    ("The scan reaches the whole room (30.7 % of its points).", True),
    ("The scan reaches 100 % of the room: the whole room.", False),
    ("All seeds pass; every one of the 3 seeds is above 90 %.", False),
    ("Every question is answered (97 % of them).", True),
    ("At 40 % of the layers every token is still there.", False),
    ("The exit never fires: 0 of 20 questions leave early.", False),
    ("The exit never fires (3 questions leave early).", True),
    ("None of the 12 questions is answered at 0 %.", False),
    ("It keeps all but the top 9 % of the tokens.", False),
    ("In all 36 scenarios the method wins.", False),
])
def test_quantifiers_against_numbers_in_one_sentence(sentence, wrong):
    assert bool([f for c in clauses(sentence) for f in in_clause_contradictions(c)]) == wrong


def test_tables_are_read_from_text_markdown_and_html():
    assert printed_tables(OLD_MEEPO_TABLE)[0]["bidirectional"] == {"points reached (%)": 30.74, "gradient-weighted distance (m)": 0.09}
    md = "| model | reached (%) |\n|---|---|\n| bidirectional | 30.7 |\n"
    assert printed_tables(md) == [{"bidirectional": {"reached (%)": 30.7}}]
    htm = "<table><thead><tr><th></th><th>reached (%)</th></tr></thead><tbody><tr><th>bidirectional</th><td>30.7</td></tr></tbody></table>"
    assert html_tables(htm) == [{"bidirectional": {"reached (%)": 30.7}}]


@pytest.mark.parametrize("path", chapter_notebooks(), ids=lambda p: p.name)
def test_chapter_prose_does_not_contradict_its_numbers(path):
    "The source notebook's markdown cells."
    assert notebook_contradictions(nbformat.read(path, as_version=4)) == []


def executed_runs() -> list[Path]:
    results = os.environ.get("PAPERLAB_RESULTS")
    if not results or not Path(results).is_dir(): return []
    from paperlab.docs import executed_path
    return [p for p in (executed_path(nb, results) for nb in chapter_notebooks()) if p.exists()]


@pytest.mark.parametrize("path", executed_runs() or [None], ids=lambda p: p.parent.name if p else "none")
def test_executed_captions_do_not_contradict_the_tables_above_them(path):
    "Every markdown cell and Markdown output of an executed run, against the tables printed just before it."
    if path is None: pytest.skip("no executed runs: set PAPERLAB_RESULTS to a folder of `paperlab reproduce` runs")
    assert notebook_contradictions(nbformat.read(path, as_version=4)) == []


# --- 2. timings and ratios through one formatter ----------------------------------------------------------------------

TIMING_NAME = re.compile(r"(_ms|_s|_sec|_seconds|seconds|latency|elapsed)$|^\w*speed\w*$|\.ratio$|(^|_)ratio$", re.I)
FORMATTERS = {"timed", "fmt_seconds", "fmt_number", "timed_frame", "describe"}

# (notebook, expression as ast.unparse writes it): why it may stay as it is
ALLOWED = {
    # not timings: names that end like one
    ("31_sgl.ipynb", "lower_s[s]"): "Wilson lower end of a seed's accuracy (_s: per seed), not a time",
    ("31_sgl.ipynb", "prior_s[s]"): "a seed's constant-answer prior (_s: per seed), not a time",
    ("12_dydit.ipynb", "kept_s"): "share of tokens kept (a percentage), not a time",
    ("10_inline.ipynb", "cost_ratio"): "a multiply-add ratio, deterministic",
    ("11_mediators.ipynb", "ratio"): "a point label r = (a ratio of the configuration), not a speed",
    ("12_dydit.ipynb", "s_fid[0.5] / fid_s"): "a ratio of FIDs (fid_s: DiT-S's FID), not a time",
    ("21_ostr_darts.ipynb", "np.median(ratio)"): "a ratio of gradient magnitudes, not a speed",
    ("21_ostr_darts.ipynb", "ARITH_RATIO"): "the ratio the arithmetic predicts, deterministic",
    # the CLI's table of chapter runs (`paperlab` commands): seconds in columns headed s
    ("06_cli.ipynb", "t['wall_s']"): "06_cli: the run table's seconds column; to convert to fmt_seconds",
    ("06_cli.ipynb", "t['cpu_s']"): "06_cli: the run table's seconds column; to convert to fmt_seconds",
    ("06_cli.ipynb", "t['lock_wait_s']"): "06_cli: the run table's seconds column; to convert to fmt_seconds",
    ("06_cli.ipynb", "sum((t['wall_s'] for t in times.values()))"): "06_cli: the run table's total; to convert to fmt_seconds",
    ("00_core.ipynb", "self.ratio"): "SpeedComparison.describe itself, the formatter of a comparison",
    ("00_core.ipynb", "self.baseline_s * 1000.0"): "SpeedComparison.describe itself",
    ("00_core.ipynb", "self.candidate_s * 1000.0"): "SpeedComparison.describe itself",
    # printed behind ⏱ or durations (sanitised), by chapters this issue did not own: to move to timed()/fmt_seconds()
    ("03_train.ipynb", "res.seconds"): "03_train: duration, sanitised; to convert to fmt_seconds",
    ("03_train.ipynb", "seeds_run.seconds"): "03_train: duration, sanitised; to convert to fmt_seconds",
    ("10_inline.ipynb", "c.seeds_to_decide * per_seed_s"): "10_inline: an estimate in seconds; to convert to fmt_seconds",
    ("10_inline.ipynb", "sum(train_s.values())"): "10_inline: duration, sanitised; to convert to fmt_seconds",
    ("10_inline.ipynb", "last.inline_ms"): "10_inline: behind ⏱; to convert to timed(x, 'ms')",
    ("10_inline.ipynb", "last.floor_ms"): "10_inline: behind ⏱; to convert to timed(x, 'ms')",
    ("10_inline.ipynb", "last.inline_ms / last.compute_floor_ms"): "10_inline: behind ⏱; to convert to timed(x, '×')",
    ("10_inline.ipynb", "last.compute_floor_ms"): "10_inline: behind ⏱; to convert to timed(x, 'ms')",
    ("10_inline.ipynb", "(sdpa_ms.float32 / sdpa_ms.bfloat16).min()"): "10_inline: stored GPU run, deterministic; to fmt_number",
    ("10_inline.ipynb", "(sdpa_ms.float32 / sdpa_ms.bfloat16).max()"): "10_inline: stored GPU run, deterministic; to fmt_number",
    ("10_inline.ipynb", "fps_cmp['bfloat16', case].ratio"): "10_inline: stored GPU run, deterministic; to fmt_number",
    ("11_mediators.ipynb", "gpu_cmp['bfloat16', 1024, 16].ratio"): "11_mediators: stored GPU run, deterministic; to fmt_number",
    ("11_mediators.ipynb", "gpu_cmp['bfloat16', 16384, 16].ratio"): "11_mediators: stored GPU run, deterministic; to fmt_number",
    ("11_mediators.ipynb", "sit_cmp['bfloat16', res].ratio"): "11_mediators: stored GPU run, deterministic; to fmt_number",
    ("11_mediators.ipynb", "per_seed_s"): "11_mediators: duration, sanitised; to convert to fmt_seconds",
    ("12_dydit.ipynb", "sc_block.ratio"): "12_dydit: behind ⏱; to convert to timed(x, '×')",
    ("12_dydit.ipynb", "1000.0 * sc_block.baseline_s"): "12_dydit: behind ⏱; to convert to timed(x, 's')",
    ("12_dydit.ipynb", "1000.0 * sc_block.candidate_s"): "12_dydit: behind ⏱; to convert to timed(x, 's')",
    ("12_dydit.ipynb", "per_seed_s * (h.seeds_to_decide - n_seeds) / 60"): "12_dydit: behind ⏱; to convert to fmt_seconds",
    ("12_dydit.ipynb", "per_seed_s"): "12_dydit: duration, sanitised; to convert to fmt_seconds",
    ("12_dydit.ipynb", "sc_sampling.ratio / flops_cut"): "12_dydit: a share of a FLOP cut realised, behind ⏱ in the caption",
    ("12_dydit.ipynb", "sc_block.ratio / flops_block"): "12_dydit: a share of a FLOP cut realised, behind ⏱ in the caption",
    ("13_enat.ipynb", "sp_r.ratio"): "13_enat: behind ⏱; to convert to timed(x, '×')",
    ("20_unitta.ipynb", "train_s"): "20_unitta: duration, sanitised; to convert to fmt_seconds",
    ("20_unitta.ipynb", "bench_s"): "20_unitta: duration, sanitised; to convert to fmt_seconds",
    ("21_ostr_darts.ipynb", "REGEN_USER_S"): "21_ostr_darts: behind ⏱; to convert to timed(x, 's')",
    ("21_ostr_darts.ipynb", "SEARCH_SECONDS"): "21_ostr_darts: duration, sanitised; to convert to fmt_seconds",
    ("21_ostr_darts.ipynb", "so[2]['seconds'] / so[1]['seconds']"): "21_ostr_darts: behind ⏱; to convert to timed(x, '×')",
}


def formatted_timings(source: str) -> list[str]:
    "Expressions of f-string fields with a format spec that name a timing or a speed ratio (`{x_ms:.2f}`, `{cmp.ratio:.3g}`)."
    code = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!")))
    try: tree = ast.parse(code)
    except SyntaxError: return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            expr = ast.unparse(node.value)
            names = [ast.unparse(n) for n in ast.walk(node.value) if isinstance(n, (ast.Name, ast.Attribute))]
            names += [n.slice.value for n in ast.walk(node.value)   # so[2]['seconds']
                      if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str)]
            if any(TIMING_NAME.search(n) for n in names): found.append(expr)
    return found


def test_the_timing_scan_finds_what_it_should():
    assert formatted_timings('print(f"{a.ratio:.2f}x in {train_s:.1f} s and {n:,}")') == ["a.ratio", "train_s"]
    assert formatted_timings('print(f"{timed(a.ratio, \'×\')} in {fmt_seconds(train_s)}")') == []
    assert formatted_timings('print(f"{1e3 * sc.baseline_s:.1f} ms")') == ["1000.0 * sc.baseline_s"]
    assert formatted_timings('print(f"{so[2][\'seconds\'] / so[1][\'seconds\']:.1f}x, {REGEN_USER_S:.0f} s")') == [
        "so[2]['seconds'] / so[1]['seconds']", "REGEN_USER_S"]


def test_timings_and_ratios_go_through_one_formatter():
    found = {(p.name, e) for p in chapter_notebooks() for c in nbformat.read(p, as_version=4).cells
             if c.cell_type == "code" for e in formatted_timings(c.source)}
    unlisted = sorted(found - set(ALLOWED))
    assert not unlisted, ("format these with paperlab.core.timed / fmt_seconds / fmt_number (or list them in ALLOWED "
                          f"with the reason): {unlisted}")
    stale = sorted(set(ALLOWED) - found)
    if stale:   # not an error in the chapters: the list is out of date
        import warnings
        warnings.warn(f"ALLOWED lists expressions that the notebooks no longer print: remove them: {stale}")
