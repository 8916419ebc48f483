#!/usr/bin/env python3
"""The imports between FlowPrefill's top-level packages, as a table, and a check of their layers.

The packages stack in this order: ``state`` (the Redis schema, client and clock: the leaf),
``replicas``, ``router``, ``bench``, ``cluster`` (the wiring: app, launcher, CLI, autoscaling).
Each may import only packages before it. Every ``import`` / ``from ... import`` statement in a
package's ``.py`` files counts, at module level and inside functions alike (a lazy import is still
a dependency), relative imports resolved; ``tests/`` and ``scripts/`` may import anything.

    python scripts/import_layers.py            # the table (rows import columns: module-level + in functions)
    python scripts/import_layers.py --check    # also exit 1, listing each import against the layers
    python scripts/import_layers.py --root DIR # another checkout

Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

LAYERS = ("state", "replicas", "router", "bench", "cluster")


def _imported(node: ast.AST, package: str, module: str) -> Iterator[str]:
    """Top-level package names an import statement names (relative ones resolved within ``module``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: within this package
            parts = module.split(".")[: -node.level]
            yield (parts or [package])[0]
        elif node.module:
            yield node.module.split(".")[0]


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """``(import node, inside a function)`` for every import statement of ``tree``."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function
            stack.append((child, inner))


def package_imports(root: Path) -> tuple[Counter[tuple[str, str, bool]], list[str]]:
    """Counts of ``(importer, imported, in_function)`` between layers, and a line per import that
    breaks the layers (``file:line: importer imports imported``)."""
    counts: Counter[tuple[str, str, bool]] = Counter()
    violations: list[str] = []
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(rel))
            for node, in_function in _walk(tree):
                for target in _imported(node, package, module):
                    if target == package or target not in LAYERS:
                        continue
                    counts[(package, target, in_function)] += 1
                    if LAYERS.index(target) > LAYERS.index(package):
                        where = "in a function" if in_function else "at module level"
                        allowed = ", ".join(LAYERS[:LAYERS.index(package)]) or "nothing"
                        violations.append(f"{rel}:{node.lineno}: {package} imports {target} ({where}); "
                                          f"{package} may import only {allowed}")
    return counts, violations


def table(counts: Counter[tuple[str, str, bool]]) -> str:
    """Markdown: a row per importer, a column per imported package, ``module-level + in functions``."""
    lines = ["| imports -> | " + " | ".join(LAYERS) + " |", "|---" * (len(LAYERS) + 1) + "|"]
    for importer in LAYERS:
        cells = []
        for target in LAYERS:
            if target == importer:
                cells.append("-")
                continue
            top, inner = counts[(importer, target, False)], counts[(importer, target, True)]
            mark = " (!)" if (top or inner) and LAYERS.index(target) > LAYERS.index(importer) else ""
            cells.append(f"{top} + {inner}{mark}" if top or inner else "")
        lines.append(f"| **{importer}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table; with ``--check``, exit 1 when an import breaks the layers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--check", action="store_true", help="exit 1 if a package imports a later layer")
    args = parser.parse_args(argv)
    counts, violations = package_imports(args.root)
    print(f"imports between packages, layers {' < '.join(LAYERS)} (module-level + in functions; (!) breaks them)\n")
    print(table(counts))
    if violations:
        print(f"\n{len(violations)} import(s) against the layers:", *violations, sep="\n")
    elif args.check:
        print("\nevery package imports only the packages before it")
    return 1 if args.check and violations else 0


if __name__ == "__main__":
    sys.exit(main())
