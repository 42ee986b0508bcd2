"""Open any index by spec: "faiss:/path", a plain index directory, or "scheme:rest" for a registered scheme.

A scheme maps to a factory `f(rest: str) -> Index`. Register one in Python with the decorator:

    @register_index("npy")
    def open_npy(rest: str) -> Index: ...

or ship it in a package, as an entry point in the group "rakt.indexes" named after the scheme, whose object is
the factory (see docs/custom-index.md). Schemes registered in Python take precedence over entry points.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from rakt.indexes.base import CORE_MEMBERS, Index, IndexSpecError
from rakt.indexes.basic import BasicIndex
from rakt.indexes.layout import INDEX_JSON
from rakt.registry import Registry
from rakt.indexes.published import is_published

ENTRY_POINT_GROUP = "rakt.indexes"
IndexFactory = Callable[[str], Index]

SCHEMES: Registry[IndexFactory] = Registry("index scheme", error=IndexSpecError, replace=True,
                                           entry_points=ENTRY_POINT_GROUP)
# a scheme is >= 2 characters so Windows drive letters ("C:\\...") still read as paths
_SPEC = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9_.+-]+):(?P<rest>.*)$", re.DOTALL)
DEFAULT_SCHEME = "faiss"  # the built-in scheme: index directories built by `rakt index build`, published folders


def register_index(scheme: str) -> Callable[[IndexFactory], IndexFactory]:
    """Decorator: register `factory(rest) -> Index` under `scheme` (a class taking `rest` works too)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]+", scheme):
        raise ValueError(f"index scheme {scheme!r} must be a letter then letters/digits/_.+- (2+ characters)")

    return SCHEMES.register(scheme)


def list_index_schemes() -> list[str]:
    """Schemes registered in Python plus those installed packages declare in the "rakt.indexes" group."""
    return sorted(SCHEMES.names())


def _factory(scheme: str) -> IndexFactory:
    if scheme not in SCHEMES.names():
        raise IndexSpecError(f"unknown index scheme '{scheme}:'; known schemes: {', '.join(list_index_schemes())}. "
                             f"Register one with @register_index('{scheme}') or install a package declaring a "
                             f"'{ENTRY_POINT_GROUP}' entry point named '{scheme}'")
    factory = SCHEMES.lookup(scheme)
    if not callable(factory):
        raise IndexSpecError(f"index scheme '{scheme}': its entry point is not callable; it must name a factory "
                             f"f(rest: str) -> Index")
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
        index = SCHEMES[DEFAULT_SCHEME](text)
        where = "faiss"
    if not isinstance(index, Index):
        missing = [name for name in CORE_MEMBERS if not hasattr(index, name)]
        if missing:
            raise IndexSpecError(f"{where} returned a {type(index).__name__}, which is not an Index: it lacks "
                                 f"{', '.join(missing)} (see rakt/indexes/base.py)")
        index = BasicIndex(index)  # an index with the core members only: the rest get their defaults
    return index


def index_spec(path: str | Path) -> str:
    """The spec that opens the index directory at `path` with the built-in scheme."""
    return f"{DEFAULT_SCHEME}:{path}"


def is_index_spec(spec: str) -> bool:
    """Whether `spec` names an index rather than image files: a 'faiss:' spec, or an index directory (built, with
    index.json, or published)."""
    return spec.startswith(f"{DEFAULT_SCHEME}:") or is_index_dir(spec)


def has_scheme(spec: str) -> bool:
    """Whether `spec` is 'scheme:rest' rather than a plain path."""
    return bool(_SPEC.match(spec)) and not Path(spec).exists()


def spec_location(spec: str) -> str:
    """Where a built-in spec's index lives: the path without the 'faiss:' prefix and '?options'."""
    return spec.removeprefix(f"{DEFAULT_SCHEME}:").split("?")[0]


def absolute_spec(spec: str) -> str:
    """The index spec with its path made absolute (plain paths and 'scheme:path' whose path exists)."""
    if Path(spec).exists():
        return str(Path(spec).resolve())
    match = _SPEC.match(spec)
    if match and match.group("rest") and Path(match.group("rest")).exists():
        return f"{match.group('scheme')}:{Path(match.group('rest')).resolve()}"
    return spec


@register_index("faiss")
def _open_faiss(rest: str) -> Index:
    from rakt.indexes.faiss_index import FaissIndex  # faiss is imported only when a FAISS index is opened

    return FaissIndex.open(rest)


def is_index_dir(path: str | Path) -> bool:
    """A built index directory (with index.json) or a published folder (FAISS parts + metadata, no index.json)."""
    path = Path(path)
    return (path / INDEX_JSON).exists() or is_published(path)
