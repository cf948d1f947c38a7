"""The `gadiag-harness` command: dispatch to one module per subcommand.

    gadiag-harness [run] [--config harness.toml] [--task T] [--teachers a,b|all] [--set k=v] …
    gadiag-harness list [KIND [NAME]] [--plugins-dir DIR]
    gadiag-harness selfcheck …
    gadiag-harness report RUN_DIR…
    gadiag-harness show RUN_DIR --question N …
    gadiag-harness docs [--check README.md | --write README.md]
    gadiag-harness study STUDY.toml | --students a,b --tasks x,y …

Each subcommand module has `main(argv) -> exit code` and is imported only when
called, so `--help`, `list`, `report` and `show` import no torch. Bad input
(unknown names, bad config, missing model) prints one line on stderr and exits
2; an environment failure (disk full, read-only folder) prints one line naming
the path and exits 1; no traceback.
"""

from __future__ import annotations

import importlib
import sys

from gadiag_core.errors import EnvironmentFailure, UsageError, cannot_write

COMMANDS = {
    "run": "gadiag_core.commands.run",
    "list": "gadiag_core.commands.list",
    "selfcheck": "gadiag_core.commands.selfcheck",
    "report": "gadiag_core.commands.report",
    "show": "gadiag_core.commands.show",
    "docs": "gadiag_core.commands.docs",
    "study": "gadiag_core.commands.study",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    try:
        return importlib.import_module(COMMANDS[command]).main(argv)
    except UsageError as exc:
        print(f"gadiag-harness: error: {exc}", file=sys.stderr)
        return 2
    except EnvironmentFailure as exc:
        print(f"gadiag-harness: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an I/O failure no layer below named: name its path
        print(f"gadiag-harness: error: {cannot_write(exc.filename or '(unknown path)', exc, 'use')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gadiag-harness: interrupted; records written so far are in the run directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
