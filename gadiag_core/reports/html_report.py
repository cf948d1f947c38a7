"""The HTML report of a run: self-contained files in RUN_DIR/report/.

    report/index.html                  the leaderboard, the plots, every question
    report/question-<id>.html          one page per question: each rollout's text
                                       as a heat-map of per-token alignment, and
                                       a matrix of every row at the scored tokens
    report/alignment_by_position.png   the plots (see gadiag_core.reports.plots)
    report/alignment_distribution.png
    report/correct_vs_incorrect.png

Inline CSS and JavaScript only; nothing is fetched from anywhere, so the folder
can be copied and opened offline. On a question page, pick the row (teacher ×
objective, or a reference row) that colours the text; hover over a scored token
for its details (π, V̂, the ideal's candidates with π, Q̂ and a*, the teachers'
top tokens, every row's cosine); click to pin them (the address then links to
that token: question-<id>.html#r<rollout>-n<position>). Green helps (cosine > 0),
red hurts; tokens that were not scored (screened out) stay uncoloured.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from pathlib import Path

from gadiag_core.reports.leaderboard import leaderboard_notes
from gadiag_core.scoring.alignment import REFERENCE_ROWS
from gadiag_core.store.records import Run, finite, ideal_candidates, load_run
from gadiag_core.reports.format import num
from gadiag_core.reports.html_assets import CSS, SCRIPT
from gadiag_core.reports.leaderboard import external_teachers_line

REPORT_DIR = "report"




def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _interval(pair) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(finite(v) for v in pair):
        return "–"
    return f"{pair[0]:+.2f}..{pair[1]:+.2f}"


def _pct(value) -> str:
    return f"{100 * value:.0f}%" if finite(value) else "–"


def colour(value) -> str:
    """Background for a cosine: green helps, red hurts, stronger with |cos|.
    Must match colour() in the page script."""
    if not finite(value):
        return "transparent"
    v = max(-1.0, min(1.0, float(value)))
    rgb = "26,152,80" if v >= 0 else "215,48,39"
    return f"rgba({rgb},{0.08 + 0.72 * abs(v):.3f})"


def page_name(question: str, taken: set[str] | None = None) -> str:
    """File name of a question's page (safe characters; unique within `taken`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", question) or "_"
    if len(safe) > 80 or safe.strip(".") == "":  # file-name limits; '.' and '..' are not names
        safe = safe[:40].strip(".") + "-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]
    base = "question-" + safe
    name, n = f"{base}.html", 1
    while taken is not None and name in taken:
        n += 1
        name = f"{base}-{n}.html"
    if taken is not None:
        taken.add(name)
    return name


def _json_for_script(value) -> str:
    """JSON safe inside <script type="application/json">."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _visible(token: str) -> str:
    """A token's text as shown: whitespace made visible where it would vanish."""
    if token == "":
        return "∅"
    return token.replace("\t", "⇥\t").replace("\n", "↵\n")


# ----------------------------------------------------------------------------
# Page skeleton (its CSS and script: gadiag_core.reports.html_assets)


def _page(title: str, body: str, script: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<link rel=\"icon\" href=\"data:,\">"
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n{script}\n</body></html>\n"
    )


def _run_header(run: Run) -> str:
    s = run.summary
    budget = s.get("budget", {})
    parts = [
        f"student <b>{_esc(s.get('student', '?'))}</b>",
        f"space {_esc(s.get('space', '?'))}",
        f"estimator {_esc(s.get('estimator', '?'))}",
        f"sampler {_esc(s.get('sampler', '?'))}",
    ]
    counts = (
        f"{s.get('questions', 0)} questions, {s.get('rollouts', 0)} rollouts "
        f"({s.get('rollouts_correct', 0)} correct, accuracy {_pct(s.get('accuracy'))}); "
        f"{budget.get('continuations', 0):.0f} continuations, {budget.get('sampled_tokens', 0):.0f} sampled tokens, "
        f"{budget.get('nodes_targeted', 0):.0f}/{budget.get('nodes_screened', 0):.0f} nodes targeted, "
        f"covered mass {num(budget.get('mean_covered_mass'), '{:.2f}')}"
    )
    banner = (
        ""
        if run.finished
        else "<div class=\"banner\">Unfinished run (no summary.json): the numbers are rebuilt from the records written so far.</div>"
    )
    external = external_teachers_line(s)
    external = f"<br>{_esc(external)}" if external else ""
    return f"<p class=\"sub\">{' · '.join(parts)}<br>{_esc(counts)}{external}</p>{banner}"


# ----------------------------------------------------------------------------
# index.html


# Categorical colours of the teacher × objective rows in the "best teacher"
# strips (Tableau 10; rows past ten reuse them).
ROW_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def teacher_rows(run: Run) -> list[str]:
    """The teacher × objective rows (no reference rows), in leaderboard order."""
    return [name for name in run.rows() if name not in REFERENCE_ROWS]


def row_colours(rows: list[str]) -> dict[str, str]:
    return {name: ROW_PALETTE[i % len(ROW_PALETTE)] for i, name in enumerate(rows)}


def _row_legend(colours: dict[str, str]) -> str:
    return "".join(f"<span class=\"swatch\" style=\"background:{c}\"></span>{_esc(name)}" for name, c in colours.items())


def _best_strip(r: int, nodes: dict, colours: dict[str, str]) -> str:
    """One cell per scored token, coloured by the row with the best cosine there
    (against the whole ideal estimate): does the best teacher change along the rollout?"""
    from gadiag_core.scoring.oracle import best_rows  # here: the oracle module needs torch

    positions = sorted(nodes)
    if not positions or not colours:
        return ""
    winners = best_rows([nodes[t] for t in positions], list(colours))
    cells = []
    for t, name in zip(positions, winners):
        token = _visible(nodes[t].get("token", "")).replace(chr(10), "")
        value = nodes[t].get("cos", {}).get(name) if name else None
        cells.append(
            f"<span data-r=\"{r}\" data-n=\"{t}\" class=\"cell\" style=\"background:{colours.get(name, '#ddd')}\" "
            f"title=\"@{t} {_esc(token)}: best {_esc(name or '–')} {num(value, '{:+.2f}')}\"></span>"
        )
    return f"<div class=\"strip\" title=\"best teacher × objective at each scored token\">{''.join(cells)}</div>"


def _oracle_html(run: Run) -> str:
    """The per-token oracle section of the index page (empty for older runs)."""
    oracle = run.summary.get("oracle")
    if not oracle or "oracle" not in oracle.get("all", {}):
        return ""
    colours = row_colours(teacher_rows(run))
    lines = []
    for split in ("all", "incorrect", "correct"):
        part = oracle.get(split, {})
        if "oracle" not in part:
            continue
        lines.append(
            f"<tr><td class=\"l\">{split}</td><td>{part['nodes']}</td><td>{num(part['oracle'])}</td><td class=\"dim\">{_interval(part.get('oracle_ci'))}</td>"
            f"<td class=\"l\">{_esc(part['best_single'])}</td><td>{num(part['single'])}</td>"
            f"<td><b>{num(part['headroom'], '{:+.3f}')}</b></td><td class=\"dim\">{_interval(part.get('headroom_ci'))}</td>"
            f"<td>{num(part['same_half_headroom'], '{:+.3f}')}</td></tr>"
        )
    wins = "".join(
        f"<tr><td class=\"l\"><span class=\"swatch\" style=\"background:{colours.get(name, '#ddd')}\"></span>{_esc(name)}</td>"
        f"<td>{count}</td><td>{oracle.get('question_top', {}).get(name, 0)}</td></tr>"
        for name, count in oracle.get("wins", {}).items()
    )
    return (
        "<h2>Per-token oracle</h2>"
        "<p class=\"dim\">At each scored token, the teacher × objective with the best cosine. The oracle picks it on one half "
        "of the ideal's estimate and is scored on the other (and vice versa), so it does not pick the noise; the best single row "
        "is chosen and scored the same way. Headroom = oracle − best single row; the last column is what picking and scoring on "
        "the same half would claim (the bias the split removes).</p>"
        "<table><thead><tr><th class=\"l\">tokens</th><th>nodes</th><th>oracle</th><th>95% CI</th><th class=\"l\">best single row</th>"
        f"<th>its align</th><th>headroom</th><th>95% CI</th><th>same-half headroom</th></tr></thead><tbody>{''.join(lines)}</tbody></table>"
        f"<p>The best row changes at <b>{_pct(oracle.get('switch_rate'))}</b> of consecutive scored tokens of a rollout "
        f"({oracle.get('switches', 0)} of {oracle.get('pairs', 0)}).</p>"
        f"<table><thead><tr><th class=\"l\">row</th><th>tokens won</th><th>questions won</th></tr></thead><tbody>{wins}</tbody></table>"
    )


def _leaderboard_html(run: Run) -> str:
    rows = run.summary.get("rows", {})
    head = "".join(
        f"<th class=\"{'l' if i < 2 else ''}\" title=\"{_esc(tip)}\">{name}</th>"
        for i, (name, tip) in enumerate(
            [
                ("teacher", "teacher (context shown to the teacher), or a reference row"),
                ("objective", "distillation objective"),
                ("align", "mean over rollouts of the rollout's cosine (its vectors stacked over its tokens), Monte-Carlo noise of the ideal estimate removed"),
                ("95% CI", "bootstrap interval of align, resampling questions"),
                ("raw", "align without the noise correction"),
                ("incorrect", "align over incorrect rollouts"),
                ("correct", "align over correct rollouts"),
                ("token", "mean per-token cosine, noise removed by SIMEX (logits space)"),
                ("token raw", "mean per-token cosine, uncorrected"),
                ("helps", "share of scored tokens with cosine > 0"),
                ("hurts", "share of scored tokens with cosine < 0"),
                ("nodes", "scored tokens with a defined cosine"),
            ]
        )
    )

    def line(name: str) -> str:
        row = rows[name]
        teacher, _, objective = name.partition("/")
        if name in REFERENCE_ROWS:
            teacher, objective = name, "reference"
        info = (run.summary.get("teacher_info") or {}).get(teacher) or {}
        if info.get("external"):  # another model: say which, its tokenizer and path
            teacher = f"{teacher} ({info.get('via')})"
        cells = "".join(
            f"<td style=\"background:{colour(row.get(key))}\">{num(row.get(key))}</td>"
            if key
            else f"<td class=\"dim\">{_interval(row.get('ci_all'))}</td>"
            for key in ("mean_all", None, "mean_all_raw", "mean_incorrect", "mean_correct", "token_all", "token_all_raw")
        )
        return (
            f"<tr><td class=\"l\">{_esc(teacher)}</td><td class=\"l\">{_esc(objective)}</td>{cells}"
            f"<td>{_pct(row.get('helps'))}</td><td>{_pct(row.get('hurts'))}</td><td>{row.get('nodes', 0)}</td></tr>"
        )

    ordered = run.rows()
    teacher_rows = "".join(line(n) for n in ordered if n not in REFERENCE_ROWS)
    reference_rows = "".join(line(n) for n in ordered if n in REFERENCE_ROWS)
    return (
        f"<table class=\"leaderboard\"><thead><tr>{head}</tr></thead><tbody>{teacher_rows}</tbody>"
        f"<tbody class=\"ref\">{reference_rows}</tbody></table>"
        + "".join(f"<p class=\"dim\">{_esc(note)}</p>" for note in leaderboard_notes(run.summary))
    )


def _index_html(run: Run, pages: dict[str, str], plots: list[str]) -> str:
    from gadiag_core.reports.plots import PLOT_FILES

    row = run.default_row()
    figures = "".join(
        f"<figure><a href=\"{_esc(name)}\"><img src=\"{_esc(name)}\" alt=\"{_esc(PLOT_FILES.get(name, name))}\"></a>"
        f"<figcaption>{_esc(PLOT_FILES.get(name, name))}</figcaption></figure>"
        for name in plots
    )
    question_rows = []
    for index, qid in enumerate(run.question_ids()):
        rollouts = run.rollouts_of(qid)
        first = rollouts[0] if rollouts else {}
        chips = []
        for r in rollouts:
            q_cos = run.question_record(qid, r["rollout"]).get("question_cos", {}).get(row) if row else None
            mark = "✓" if r.get("correct") else "✗"
            chips.append(
                f"<a class=\"chip\" style=\"background:{colour(q_cos)}\" href=\"{_esc(pages[qid])}#r{r['rollout']}\" "
                f"title=\"rollout {r['rollout']}: {'correct' if r.get('correct') else 'incorrect'}; {_esc(row or '')} {num(q_cos)}\">"
                f"r{r['rollout']} {mark}</a>"
            )
        scored = sum(len(run.nodes(qid, r["rollout"])) for r in rollouts)
        text = str(first.get("question_text", ""))
        question_rows.append(
            f"<tr><td>{index}</td><td class=\"l\"><a href=\"{_esc(pages[qid])}\">{_esc(qid)}</a></td>"
            f"<td class=\"l\" title=\"{_esc(text)}\">{_esc(text[:90] + ('…' if len(text) > 90 else ''))}</td>"
            f"<td class=\"l\">{_esc(first.get('answer', ''))}</td><td class=\"l\">{''.join(chips)}</td><td>{scored}</td></tr>"
        )
    files = [
        f"<a href=\"../{name}\">{name}</a>"
        for name in (
            "summary.json", "config.toml", "tokens.parquet", "questions.parquet", "rollouts.parquet",
            "tokens.jsonl", "questions.jsonl", "rollouts.jsonl",
        )
        if (run.path / name).is_file()
    ]
    body = (
        f"<h1>Gradient alignment · task {_esc(run.task_label)}</h1>{_run_header(run)}"
        f"<h2>Leaderboard</h2>{_leaderboard_html(run)}"
        f"{_oracle_html(run)}"
        f"<p class=\"dim\">Cosine between each teacher's distillation update and the ideal (outcome-optimal) update, "
        f"per scored token. The reference rows bound it: <b>rl_outcome</b> is plain outcome RL, "
        f"<b>noise_ceiling</b> the agreement of two independent halves of the ideal's estimate.</p>"
        f"<h2>Plots</h2>{figures}"
        f"<h2>Questions</h2><p class=\"dim\">Rollouts coloured by their alignment for <b>{_esc(row or '–')}</b> "
        f"(✓ correct, ✗ incorrect); open a question for its tokens.</p>"
        f"<table class=\"questions\"><thead><tr><th>#</th><th class=\"l\">question</th><th class=\"l\">text</th>"
        f"<th class=\"l\">answer</th><th class=\"l\">rollouts</th><th>scored tokens</th></tr></thead>"
        f"<tbody>{''.join(question_rows)}</tbody></table>"
        f"<h2>Files</h2><p>{' · '.join(files)}</p>"
    )
    return _page(f"gadiag · {run.task_label} · {run.name}", body)


# ----------------------------------------------------------------------------
# question pages


def _node_data(record: dict, tau: float) -> dict:
    """What the page script shows for one scored token."""
    candidates = [list(c) for c in ideal_candidates(record, tau)]
    value = record.get("value")
    return _clean(
        {
            "token": record.get("token", ""),
            "token_id": record.get("token_id"),
            "pi": record.get("pi_token"),
            "pi_max": record.get("pi_max"),
            "value": value,
            "mass": record.get("covered_mass"),
            "cands": candidates,
            "cos": record.get("cos", {}),
            "top": record.get("teacher_top", {}),
        }
    )


def _rollout_section(run: Run, qid: str, rollout: dict, rows: list[str], row: str | None) -> tuple[str, dict]:
    r = rollout["rollout"]
    nodes = run.nodes(qid, r)
    record = run.question_record(qid, r)
    q_cos = record.get("question_cos", {})
    tokens = rollout.get("tokens")
    n_tokens = len(tokens) if tokens is not None else len(rollout.get("generated_ids", [])) or record.get("tokens", 0)

    if tokens is not None:
        spans = []
        for t, token in enumerate(tokens):
            node = nodes.get(t)
            if node is None:
                spans.append(f"<span class=\"tok\">{_esc(_visible(token))}</span>")
                continue
            value = node.get("cos", {}).get(row) if row else None
            spans.append(
                f"<span class=\"tok s{'' if finite(value) else ' nan'}\" id=\"r{r}-n{t}\" data-r=\"{r}\" data-n=\"{t}\" "
                f"style=\"background:{colour(value)}\">{_esc(_visible(token))}</span>"
            )
        text = f"<div class=\"text\">{''.join(spans)}</div>"
    else:
        text = (
            f"<div class=\"text\">{_esc(rollout.get('text', ''))}</div>"
            "<p class=\"dim\">This run did not record per-token strings (rollouts.jsonl has no <code>tokens</code>): "
            "the text is shown uncoloured; the scored tokens are in the table below.</p>"
        )

    positions = sorted(nodes)
    header = "".join(
        f"<th class=\"tokh\" title=\"position {t}\">{_esc(_visible(nodes[t].get('token', '')).replace(chr(10), ''))}"
        f"<br><span class=\"dim\">@{t}</span></th>"
        for t in positions
    )
    lines = []
    for name in rows:
        cells = "".join(
            f"<td class=\"cell\" data-r=\"{r}\" data-n=\"{t}\" style=\"background:{colour(v)}\">{num(v, '{:+.2f}')}</td>"
            for t in positions
            for v in [nodes[t].get("cos", {}).get(name)]
        )
        selected = ' class="sel"' if name == row else ""
        lines.append(
            f"<tr data-row=\"{_esc(name)}\"{selected}><td class=\"l\">{_esc(name)}</td>"
            f"<td style=\"background:{colour(q_cos.get(name))}\">{num(q_cos.get(name))}</td>{cells}</tr>"
        )
    matrix = (
        f"<table class=\"matrix\"><thead><tr><th class=\"l\">row</th><th title=\"alignment of the whole rollout\">rollout</th>"
        f"{header}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
        if positions
        else "<p class=\"dim\">No token of this rollout was scored.</p>"
    )
    skipped = record.get("skipped_teachers") or []
    verdict = "✓ correct" if rollout.get("correct") else "✗ incorrect"
    heading = (
        f"<h2 id=\"r{r}\">Rollout {r} · {verdict} · {n_tokens} tokens, {len(nodes)} scored · "
        f"this rollout's alignment <span class=\"chip qcos\" data-r=\"{r}\" "
        f"style=\"background:{colour(q_cos.get(row) if row else None)}\">{num(q_cos.get(row) if row else None)}</span></h2>"
    )
    note = f"<p class=\"dim\">Teachers skipped on this rollout: {_esc(', '.join(skipped))}</p>" if skipped else ""
    strip = _best_strip(r, nodes, row_colours([name for name in rows if name not in REFERENCE_ROWS]))
    body = (
        f"<section class=\"rollout\">{heading}{note}{text}{strip}"
        f"<details open><summary class=\"dim\">every row at the scored tokens</summary>{matrix}</details></section>"
    )
    data = {"qcos": _clean(q_cos), "nodes": {str(t): _node_data(nodes[t], run.temperature) for t in positions}}
    return body, data




def _question_html(run: Run, qid: str, index: int, pages: dict[str, str], order: list[str]) -> str:
    rows = run.rows()
    row = run.default_row()
    rollouts = run.rollouts_of(qid)
    first = rollouts[0] if rollouts else {}
    sections, data = [], {}
    for rollout in rollouts:
        section, rollout_data = _rollout_section(run, qid, rollout, rows, row)
        sections.append(section)
        data[str(rollout["rollout"])] = rollout_data

    options = "".join(
        f"<option value=\"{_esc(name)}\"{' selected' if name == row else ''}>{_esc(name)}</option>" for name in rows
    )
    legend = "".join(
        f"<span style=\"background:{colour(v)}\">{v:+.1f}</span>" for v in (-1, -0.5, -0.2, 0.2, 0.5, 1)
    )
    prev_link = f"<a class=\"keep-row\" href=\"{_esc(pages[order[index - 1]])}\">← previous</a>" if index > 0 else ""
    next_link = f"<a class=\"keep-row\" href=\"{_esc(pages[order[index + 1]])}\">next →</a>" if index + 1 < len(order) else ""
    nav = " · ".join(
        part
        for part in (
            "<a class=\"keep-row\" href=\"index.html\">leaderboard</a>",
            f"question {index + 1} of {len(order)}",
            prev_link,
            next_link,
        )
        if part
    )
    question = ""
    if first.get("question_text"):
        question += f"<p><b>{_esc(first['question_text'])}</b></p>"
    if first.get("answer") not in (None, ""):
        question += f"<p class=\"sub\">reference answer: {_esc(first['answer'])}</p>"
    body = (
        f"<nav>{nav}</nav><h1>Question {_esc(qid)} <span class=\"sub\">· {_esc(run.task_label)}</span></h1>{question}"
        f"<div class=\"controls\">colour by <select id=\"row\">{options}</select> "
        f"<span class=\"legend\">hurts {legend} helps</span> "
        f"<span class=\"dim\">· underlined tokens were scored (dotted: cosine undefined); the rest were screened out. "
        f"Hover for details, click to pin.</span>"
        f"<div class=\"dim\">best teacher strip (one cell per scored token):{_row_legend(row_colours([n for n in rows if n not in REFERENCE_ROWS]))}</div></div>"
        + "".join(sections)
        + "<div id=\"tip\" hidden></div>"
    )
    payload = {"rows": rows, "rollouts": data}
    script = f"<script type=\"application/json\" id=\"data\">{_json_for_script(payload)}</script>\n<script>{SCRIPT}</script>"
    return _page(f"gadiag · question {qid} · {run.name}", body, script)


# ----------------------------------------------------------------------------


def write_html_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/ (index.html, a page per question, the PNG plots);
    returns the path of index.html."""
    from gadiag_core.reports.plots import write_plots

    run = load_run(run_dir)
    folder = run.path / REPORT_DIR
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("question-*.html"):
        stale.unlink()
    plots = [p.name for p in write_plots(run, folder)]
    order = run.question_ids()
    taken: set[str] = set()
    pages = {qid: page_name(qid, taken) for qid in order}
    for index, qid in enumerate(order):
        (folder / pages[qid]).write_text(_question_html(run, qid, index, pages, order), encoding="utf-8")
    index_path = folder / "index.html"
    index_path.write_text(_index_html(run, pages, plots), encoding="utf-8")
    return index_path
