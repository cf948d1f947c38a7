"""`gadiag-harness show RUN_DIR --question N [--rollout R] [--teacher T]`.

A rollout's tokens in the terminal, each scored token's background coloured by
its alignment for one row (green helps, red hurts, stronger with |cos|;
unscored tokens, screened out, are left plain), then a table of the scored
tokens: cosine, π of the token, V̂, the ideal's top candidates with their Q̂
(ordered by a* = π(Q̂ − V̂)/τ when the run recorded the candidates' π, else by
Q̂), and the teacher's own top tokens when recorded.

    --question N   a question id (L1-0000) or its index in the run (0, 1, …)
    --rollout R    one rollout of it (default: all of them)
    --teacher T    a row (solution/reverse_kl, rl_outcome) or a teacher name
                   (then --objective, default the run's first objective);
                   default: the leaderboard's top row
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gadiag_core.commands.common import ArgumentParser
from gadiag_core.scoring.alignment import REFERENCE_ROWS
from gadiag_core.errors import UsageError, did_you_mean
from gadiag_core.store.records import Run, finite, ideal_candidates, load_run
from gadiag_core.reports.format import num

TOP_CANDIDATES = 4


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="gadiag-harness show", description="A rollout's tokens coloured by their alignment with the ideal gradient.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--question", required=True, metavar="N", help="question id, or its 0-based index in the run")
    p.add_argument("--rollout", type=int, metavar="R", help="only this rollout (default: every rollout of the question)")
    p.add_argument("--teacher", metavar="T", help="row to colour by: TEACHER/OBJECTIVE, a reference row, or a teacher name")
    p.add_argument("--objective", metavar="O", help="objective for a bare --teacher name (default: the run's first)")
    return p




def quoted(token: str) -> str:
    """A token shown unambiguously: quotes, escapes for newlines and the like."""
    return "'" + json.dumps(str(token), ensure_ascii=False)[1:-1] + "'"


def style_for(value) -> str:
    """Rich style of a scored token: background from grey (cos 0) to green (+1) or red (−1)."""
    if not finite(value):
        return "underline"
    v = max(-1.0, min(1.0, float(value)))
    target = (26, 152, 80) if v >= 0 else (215, 48, 39)
    w = 0.25 + 0.75 * abs(v)
    r, g, b = (round(80 + (c - 80) * w) for c in target)
    return f"bold white on rgb({r},{g},{b})"


def resolve_row(run: Run, teacher: str | None, objective: str | None) -> str | None:
    """The row to colour by; None when nothing was scored and none was asked for."""
    rows = run.rows()
    if not rows:
        if teacher or objective:
            raise UsageError(f"{run.path} has no scored tokens yet, so no row {teacher or objective!r}")
        return None
    if teacher is None:
        if objective:
            matching = [r for r in rows if r.partition("/")[2] == objective]
            if not matching:
                raise UsageError(f"no row with objective {objective!r} in {run.path}.{did_you_mean(objective, {r.partition('/')[2] for r in rows})}")
            return matching[0]
        return rows[0]
    if teacher in rows:
        return teacher
    objectives = (
        run.summary.get("objectives")
        or run.config.get("run", {}).get("objectives")
        or sorted({r.partition("/")[2] for r in rows if "/" in r})
    )
    if objective:
        objectives = [objective]
    for candidate in objectives:
        if f"{teacher}/{candidate}" in rows:
            return f"{teacher}/{candidate}"
    teachers = sorted({r.partition("/")[0] for r in rows})
    raise UsageError(
        f"no row {teacher!r}{f' with objective {objective!r}' if objective else ''} in {run.path}."
        f"{did_you_mean(teacher, rows + teachers)} Rows: {', '.join(rows)}"
    )


def rollout_text(run: Run, question: str, rollout: dict, row: str | None) -> Text:
    nodes = run.nodes(question, rollout["rollout"])
    tokens = rollout.get("tokens")
    if tokens is None:
        return Text(str(rollout.get("text", "")))
    text = Text()
    for position, token in enumerate(tokens):
        node = nodes.get(position)
        if node is None:
            text.append(token)
        else:
            # A scored newline still needs a visible cell to carry its colour.
            shown = token.replace("\n", "↵\n") if token else "∅"
            text.append(shown, style=style_for(node.get("cos", {}).get(row)))
    return text


def nodes_table(run: Run, question: str, rollout: int, row: str) -> Table:
    teacher = row.partition("/")[0] if row not in REFERENCE_ROWS else None
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("pos", justify="right")
    table.add_column("token")
    table.add_column("cos", justify="right")
    table.add_column("π", justify="right")
    table.add_column("V̂", justify="right")
    table.add_column("ideal's candidates\nQ̂" + (" (a*)" if any("candidate_pi" in n for n in run.tokens) else ""))
    if teacher:
        table.add_column(f"{teacher}'s\ntop tokens")
    for position, record in sorted(run.nodes(question, rollout).items()):
        value = record.get("cos", {}).get(row)
        candidates = ideal_candidates(record, run.temperature)
        listed = "\n".join(
            f"{quoted(token)} {num(q, '{:.2f}')}" + (f" ({num(a, '{:+.3f}')})" if a is not None else "")
            for token, _, q, _, a in candidates[:TOP_CANDIDATES]
        )
        if len(candidates) > TOP_CANDIDATES:
            listed += f"\n… {len(candidates) - TOP_CANDIDATES} more"
        cells = [
            str(position),
            quoted(record.get("token", "")),
            Text(num(value), style=style_for(value) if finite(value) else "dim"),
            num(record.get("pi_token"), "{:.3f}"),
            num(record.get("value"), "{:.3f}"),
            listed,
        ]
        if teacher:
            top = (record.get("teacher_top") or {}).get(teacher)
            cells.append("\n".join(f"{quoted(t)} {num(p, '{:.2f}')}" for t, p in top) if top else Text("not recorded", style="dim"))
        table.add_row(*cells)
    return table


def unscored_reason(run: Run, rollout: dict, record: dict) -> str:
    """Why the estimator scored no node of a diagnosed rollout, from its record."""
    budget = record.get("budget") or {}
    n_tokens = record.get("tokens", len(rollout.get("generated_ids", [])))
    limit = run.config.get("student", {}).get("max_new_tokens")
    if not n_tokens:
        return "the rollout is empty"
    eligible = budget.get("nodes_eligible")
    epsilon = run.config.get("estimator", {}).get("screen_epsilon")
    if eligible == 0:
        return (
            f"the student was nearly certain at all {n_tokens} tokens (1 − π_max < screen_epsilon"
            + (f" = {epsilon}" if epsilon is not None else "")
            + "), so every ideal vector is provably tiny (‖a*‖₁ ≤ 2(1 − π_max)/τ)"
        )
    spent = budget.get("continuations")
    outcome = "correct" if rollout.get("correct") else "incorrect"
    cut = f", cut at the max_new_tokens = {limit} limit" if rollout.get("cut") and limit else ""
    return (
        f"the rollout is {outcome}{cut}; of {eligible if eligible is not None else n_tokens} uncertain nodes none was targeted"
        + (f" after {spent:.0f} continuations" if isinstance(spent, (int, float)) else "")
        + ": the value estimates did not change along the rollout (when every continuation ends the same way, "
        "Q̂ = V̂ and the ideal gradient is zero)"
    )


def unscored_counts(run: Run, record: dict, scored: int) -> str:
    """Why the plain tokens of a scored rollout were not scored, with counts."""
    budget = record.get("budget") or {}
    total, eligible = record.get("tokens"), budget.get("nodes_eligible")
    if not isinstance(total, int) or not isinstance(eligible, int):
        return "plain tokens were not scored (screened out or not targeted)"
    cap = run.config.get("estimator", {}).get("max_nodes")
    return (
        f"{scored} of {total} tokens scored; {total - eligible} screened out (the student was nearly certain: "
        f"1 − π_max < screen_epsilon), {max(0, eligible - scored)} uncertain but not targeted (the value did not "
        f"change around them{f', or the max_nodes = {cap} cap' if cap else ''})"
    )


def undefined_reason(records) -> str:
    """Why no cosine is defined at scored nodes: a zero ideal vector (flat Q̂) or a zero teacher vector."""
    flat = all(
        len({round(q, 12) for q in (r.get("q_hat") or []) if finite(q)}) <= 1 for r in records
    )
    if flat:
        return (
            "every candidate token led to the same outcome (Q̂ equal for all candidates), so the ideal gradient "
            "is zero there; questions the student solves sometimes give non-zero ones"
        )
    return "the distillation vector is zero there (the teacher agrees with the student exactly)"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    run = load_run(args.run_dir)
    question = run.resolve_question(args.question)
    row = resolve_row(run, args.teacher, args.objective)
    rollouts = run.rollouts_of(question)
    if args.rollout is not None:
        rollouts = [r for r in rollouts if r["rollout"] == args.rollout]
        if not rollouts:
            known = ", ".join(str(r["rollout"]) for r in run.rollouts_of(question))
            raise UsageError(f"question {question} has no rollout {args.rollout} (rollouts: {known})")

    console = Console(highlight=False)
    first = run.rollouts_of(question)[0]
    console.print(f"[bold]question {question}[/bold] · {run.task_label} · {run.path}")
    if first.get("question_text"):
        console.print(f"  {first['question_text']}" + (f"   [dim](reference answer {first['answer']})[/dim]" if first.get("answer") not in (None, "") else ""))
    legend = Text("colour: ")
    legend.append(row or "(nothing scored)", style="bold")
    legend.append("  ")
    for v in (-1.0, -0.5, 0.0, 0.5, 1.0):
        legend.append(f" {v:+.1f} ", style=style_for(v))
    legend.append("  red hurts, green helps; plain tokens were not scored")
    console.print(legend)
    for rollout in rollouts:
        r = rollout["rollout"]
        nodes = run.nodes(question, r)
        record = run.question_record(question, r)
        n_tokens = len(rollout["tokens"]) if "tokens" in rollout else len(rollout.get("generated_ids", []))
        verdict = "[green]✓ correct[/green]" if rollout.get("correct") else "[red]✗ incorrect[/red]"
        console.rule(
            f"rollout {r} · {verdict} · {n_tokens} tokens, {len(nodes)} scored · "
            f"rollout alignment {num(record.get('question_cos', {}).get(row))}",
            align="left",
        )
        console.print(rollout_text(run, question, rollout, row))
        if "tokens" not in rollout:
            console.print("[dim](this run did not record per-token strings; the scored tokens are listed below)[/dim]")
        if nodes and record:
            console.print(f"[dim]{unscored_counts(run, record, len(nodes))}[/dim]", highlight=False)
        console.print()
        if nodes:
            console.print(nodes_table(run, question, r, row))
            if not any(finite((n.get("cos") or {}).get(row)) for n in nodes.values()):
                console.print(f"[dim]no cosine is defined at the {len(nodes)} scored tokens: {undefined_reason(nodes.values())}[/dim]", highlight=False)
        elif not record:
            console.print("[dim]this rollout has not been diagnosed yet (unfinished run)[/dim]")
        else:
            console.print(f"[dim]no token of this rollout was scored: {unscored_reason(run, rollout, record)}[/dim]", highlight=False)
        console.print()
    return 0
