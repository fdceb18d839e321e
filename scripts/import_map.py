"""Print (or ``--write`` into docs/architecture.md) which part of ckptd imports which, read from the code.

A part is a subpackage (``store``, ``persist``, ...) or a top-level module (``hook``, ``cli``, ...); an
import inside a function counts like one at the top. ``tests/test_import_map.py`` fails when the
document and the code disagree, so the map cannot drift.
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ckptd")
DOC = os.path.join(ROOT, "docs", "architecture.md")
START, END = "<!-- import-map: start (scripts/import_map.py --write) -->", "<!-- import-map: end -->"


def _part(module: str) -> str:
    """``ckptd.store.s3`` -> ``store``; ``ckptd.hook`` -> ``hook``; ``ckptd`` -> ``ckptd``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(path: str) -> set[str]:
    """Every ckptd module ``path`` imports, relative imports resolved."""
    module = _module_of(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ckptd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "ckptd":
                found.add(target)
    return found


def import_map() -> dict[str, list[str]]:
    """Each part of ckptd and the other parts it imports, sorted."""
    edges: dict[str, set[str]] = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                src = _part(_module_of(path))
                deps = edges.setdefault(src, set())
                deps.update(p for p in map(_part, _imports(path)) if p not in (src, "ckptd"))
    return {part: sorted(deps) for part, deps in sorted(edges.items()) if part != "ckptd"}


def render() -> str:
    parts = import_map()
    width = max(map(len, parts)) + 1
    lines = ["```", f"{'part':<{width}} imports"]
    for part, deps in parts.items():
        lines.append(f"{part:<{width}} {', '.join(deps) or '-'}")
    lines.append("```")
    return "\n".join(lines)


def documented(text: str) -> str | None:
    """The map between the markers in ``text``; None without markers."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main() -> None:
    if "--write" not in sys.argv[1:]:
        print(render())
        return
    with open(DOC) as f:
        text = f.read()
    if documented(text) is None:
        sys.exit(f"{DOC} has no {START} ... {END} markers; add them where the map belongs")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(DOC, "w") as f:
        f.write(f"{head}{START}\n{render()}\n{END}{tail}")


if __name__ == "__main__":
    main()
