"""Nested state ⇄ flat ``{fqn: leaf}`` in DCP's naming, with paths that rebuild it.

FQNs join keys with dots as DCP's own flattening does, so
``dcp.load({"model": m.state_dict()}, ...)`` finds ``model.<param>``. Each
leaf also keeps a typed path (dict key, list or tuple index) so ckptd
rebuilds int-keyed optimizer state exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

Path = tuple[tuple[str, Any], ...]

_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)


@dataclass(frozen=True)
class Leaf:
    """One saved value and where it sits in the nested state."""

    fqn: str
    path: Path
    value: Any


def flatten(state: Mapping[str, Any]) -> list[Leaf]:
    """Flatten ``state``; raise ConfigError for a value restore could not load safely."""
    leaves: list[Leaf] = []
    seen: dict[str, Path] = {}
    for key, value in state.items():
        _walk((("d", key),), value, leaves)
    for leaf in leaves:
        if leaf.fqn in seen:
            raise ConfigError(f"two saved values share the name {leaf.fqn!r}; rename a key in the state dicts")
        seen[leaf.fqn] = leaf.path
    return leaves


def _walk(path: Path, value: Any, out: list[Leaf]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(Leaf(_fqn(path), path, value))
    elif isinstance(value, Mapping) and value:
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise ConfigError(
                    f"key {k!r} under {_fqn(path)!r} is a {type(k).__name__}; state dict keys must be str or int"
                )
            _walk(path + (("d", k),), v, out)
    elif isinstance(value, (list, tuple)) and _holds_tensor(value):
        kind = "t" if isinstance(value, tuple) else "l"
        for i, v in enumerate(value):
            _walk(path + ((kind, i),), v, out)
    else:
        check_plain(value, _fqn(path))
        out.append(Leaf(_fqn(path), path, value))


def is_empty(value: Any) -> bool:
    """An empty container: DCP cannot hold one, so the manifest records it itself."""
    return isinstance(value, (dict, list, tuple)) and len(value) == 0


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def check_plain(value: Any, where: str) -> None:
    """Raise ConfigError unless ``value`` is plain data that weights_only loading accepts."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            check_plain(v, where)
        return
    if isinstance(value, (dict, OrderedDict)):
        for k, v in value.items():
            check_plain(k, where)
            check_plain(v, where)
        return
    raise ConfigError(
        f"{where!r} holds a {type(value).__module__}.{type(value).__qualname__}; snapshots keep "
        "only tensors and plain Python values (int, float, str, bytes, list, dict...) so restore "
        "never unpickles code: convert it in state_dict() (e.g. int(x), x.tolist())"
    )


def _fqn(path: Path) -> str:
    return ".".join(str(k) for _kind, k in path)


def unflatten(pairs: Iterable[tuple[Path, Any]]) -> dict[str, Any]:
    """Rebuild the nested state from (path, value) pairs."""
    root: dict = {}
    tuples: list[tuple[Any, Any]] = []
    for path, value in pairs:
        node = root
        for depth, (_kind, key) in enumerate(path):
            last = depth == len(path) - 1
            child_kind = None if last else path[depth + 1][0]
            if last:
                _set(node, key, value)
                break
            child = _get(node, key)
            if child is None:
                child = {} if child_kind == "d" else []
                _set(node, key, child)
                if child_kind == "t":
                    tuples.append((node, key))
            node = child
    for parent, key in reversed(tuples):
        parent[key] = tuple(parent[key])
    return root


def _get(node, key):
    if isinstance(node, dict):
        return node.get(key)
    return node[key] if key < len(node) else None


def _set(node, key, value) -> None:
    if isinstance(node, dict):
        node[key] = value
        return
    while len(node) <= key:
        node.append(None)
    node[key] = value
