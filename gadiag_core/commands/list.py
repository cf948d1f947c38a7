"""`gadiag-harness list [KIND] [NAME]`: tables of every registered component,
and a plugin's options."""

from __future__ import annotations

from gadiag_core.commands.common import ArgumentParser, add_common


def parser() -> ArgumentParser:
    from gadiag_core.registry import KINDS

    kinds = list(KINDS) + [f"{k}s" for k in KINDS]
    p = ArgumentParser(prog="gadiag-harness list", description="Tables of every registered component; with KIND NAME, that plugin's options.")
    p.add_argument("kind", nargs="?", choices=kinds, metavar="KIND", help=f"only this kind: {', '.join(KINDS)}")
    p.add_argument("name", nargs="?", help="one plugin of KIND: print its options")
    add_common(p)
    return p


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from gadiag_core.options import describe_options
    from gadiag_core.registry import KINDS, load_registry

    args = parser().parse_args(argv)
    kind = args.kind[:-1] if args.kind and args.kind not in KINDS else args.kind
    registry = load_registry(args.plugins_dir)
    console = Console()
    if args.name:
        entry = registry.get(kind, args.name)
        console.print(f"[bold]{kind} {entry.name}[/bold] — {entry.description} [dim]({entry.source})[/dim]")
        rows = describe_options(entry.options)
        if not rows:
            console.print("no options")
            return 0
        table = Table(title="options", title_justify="left")
        for column in ("option", "type", "default", "range", "help"):
            table.add_column(column, style="bold" if column == "option" else None)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return 0
    for k in [kind] if kind else KINDS:
        table = Table(title=f"{k}s", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        table.add_column("options")
        table.add_column("from", style="dim")
        for name in registry.names(k):
            entry = registry.get(k, name)
            options = ", ".join(f"{r[0]}={r[2]}" for r in describe_options(entry.options))
            table.add_row(name, entry.description, options, entry.source)
        console.print(table)
    return 0
