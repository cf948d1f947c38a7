"""The architecture, pinned: the core imports no plugin and no command, and the
light commands import no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "gadiag_core"
PLUGIN_PACKAGES = ("gadiag_plugins", "gadiag_tasks", "gadiag_teachers")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
    return names


def core_files():
    return [p for p in sorted(CORE.rglob("*.py")) if "commands" not in p.relative_to(CORE).parts]


def test_core_imports_no_plugin_and_no_command():
    offenders = []
    for path in core_files():
        for name in imported_modules(path):
            if name.startswith(PLUGIN_PACKAGES) or name.startswith("gadiag_core.commands"):
                offenders.append(f"{path.relative_to(CORE.parent)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_commands_import_no_plugin():
    """Commands get plugins from the registry (selfcheck's exact environment
    through `register_environments`), never by import."""
    offenders = [
        f"{path.relative_to(CORE.parent)} imports {name}"
        for path in sorted((CORE / "commands").rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith(PLUGIN_PACKAGES)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_catches_an_offender(tmp_path, monkeypatch):
    """The walk sees imports inside functions too (a check that cannot fail is no check)."""
    bad = CORE / "_offender_probe.py"
    bad.write_text("def f():\n    from gadiag_plugins.estimation import targeted\n")
    try:
        assert any(n.startswith("gadiag_plugins") for n in imported_modules(bad))
    finally:
        bad.unlink()


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["list"], ["list", "estimator", "targeted"], ["report", "--help"], ["show", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_light_commands_import_no_torch(argv):
    code = (
        "import sys\n"
        "from gadiag_core.commands.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'ray') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
