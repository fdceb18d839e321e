"""The import map in docs/architecture.md is the code's, and the code keeps the layout's rules."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import import_map  # noqa: E402


def test_the_documented_map_is_the_codes():
    with open(import_map.DOC) as f:
        documented = import_map.documented(f.read())
    assert documented == import_map.render(), "run: python scripts/import_map.py --write"


def test_the_layouts_rules_hold():
    parts = import_map.import_map()
    assert set(parts["store"]) <= {"errors"}, "store/ imports nothing of ckptd but its errors"
    assert set(parts["policy"]) <= {"errors"}, "policy/ is pure"
    assert not [p for p, deps in parts.items() if "cli" in deps], "nothing imports cli.py"
    assert not [d for d in parts["cli"] if d.startswith("_")], "cli.py uses no internals of the hook"
    assert "hook" not in parts["daemon"] and "snapshot" not in parts["policy"]
