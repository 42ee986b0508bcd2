"""Open any index by spec: "faiss:/path", a plain index directory, or "scheme:rest" for a registered scheme.

A scheme maps to a factory `f(rest: str) -> Index`. Register one in Python with the decorator:

    @register_index("npy")
    def open_npy(rest: str) -> Index: ...

or ship it in a package, as an entry point in the group "rakt.indexes" named after the scheme, whose object is
the factory (see docs/custom-index.md). Schemes registered in Python take precedence over entry points.
"""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Callable

from indexes.base import Index, IndexSpecError

ENTRY_POINT_GROUP = "rakt.indexes"
IndexFactory = Callable[[str], Index]

_REGISTRY: dict[str, IndexFactory] = {}
# a scheme is >= 2 characters so Windows drive letters ("C:\\...") still read as paths
_SPEC = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9_.+-]+):(?P<rest>.*)$", re.DOTALL)
_PROTOCOL_MEMBERS = ("dim", "metric", "size", "model", "search", "metadata", "embeddings", "info")


def register_index(scheme: str) -> Callable[[IndexFactory], IndexFactory]:
    """Decorator: register `factory(rest) -> Index` under `scheme` (a class taking `rest` works too)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]+", scheme):
        raise ValueError(f"index scheme {scheme!r} must be a letter then letters/digits/_.+- (2+ characters)")

    def decorate(factory: IndexFactory) -> IndexFactory:
        _REGISTRY[scheme] = factory
        return factory

    return decorate


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_index_schemes() -> list[str]:
    """Schemes registered in Python plus those installed packages declare in the "rakt.indexes" group."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _factory(scheme: str) -> IndexFactory:
    if scheme in _REGISTRY:
        return _REGISTRY[scheme]
    ep = _entry_points().get(scheme)
    if ep is None:
        raise IndexSpecError(f"unknown index scheme '{scheme}:'; known schemes: {', '.join(list_index_schemes())}. "
                             f"Register one with @register_index('{scheme}') or install a package declaring a "
                             f"'{ENTRY_POINT_GROUP}' entry point named '{scheme}'")
    try:
        factory = ep.load()
    except Exception as e:  # an installed plugin that fails to import: say which one
        raise IndexSpecError(f"index scheme '{scheme}': entry point {ep.value!r} ({ENTRY_POINT_GROUP}) failed to "
                             f"load: {type(e).__name__}: {e}; reinstall or fix that package") from e
    if not callable(factory):
        raise IndexSpecError(f"index scheme '{scheme}': entry point {ep.value!r} is not callable; it must name a "
                             f"factory f(rest: str) -> Index")
    return factory


def open_index(spec: str | Path) -> Index:
    """Open an index from its spec; the result is checked against the Index protocol."""
    text = str(spec)
    match = _SPEC.match(text)
    if match and not Path(text).exists():
        scheme, rest = match.group("scheme"), match.group("rest")
        index = _factory(scheme)(rest)
        where = f"index scheme '{scheme}'"
    else:
        if not Path(text).exists():
            raise IndexSpecError(f"{text}: no such index directory; pass an index directory (with index.json), "
                                 f"'faiss:/path', or 'scheme:rest' for one of: {', '.join(list_index_schemes())}")
        index = _REGISTRY["faiss"](text)
        where = "faiss"
    if not isinstance(index, Index):
        missing = [name for name in _PROTOCOL_MEMBERS if not hasattr(index, name)]
        raise IndexSpecError(f"{where} returned a {type(index).__name__}, which is not an Index: it lacks "
                             f"{', '.join(missing)} (see indexes/base.py)")
    return index


@register_index("faiss")
def _open_faiss(rest: str) -> Index:
    from indexes.faiss_index import FaissIndex  # faiss is imported only when a FAISS index is opened

    return FaissIndex.open(rest)
