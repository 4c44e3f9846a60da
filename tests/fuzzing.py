"""What the two fuzz tests share (fhir_gateway/tests/test_fuzz.py for /fhir,
tests/test_api_fuzz.py for /api and the web forms): hypothesis settings, catching the
exceptions the server logs, the record of a request for a failure message, rolled-back
examples, and random mutations of a valid JSON document. What a valid request and a
proper error answer are stays in each test."""

from __future__ import annotations

import copy
import json
import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

JSON = Any
Path = tuple[str | int, ...]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fuzz_settings(max_examples: int, scale_variable: str) -> settings:
    """Deterministic; ``<scale_variable>=10`` tries ten times as many examples (a longer
    hunt)."""
    return settings(
        max_examples=max_examples * int(os.environ.get(scale_variable, "1")),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# --------------------------------------------------------------------------- server errors


class ErrorLog(logging.Handler):
    """The records logged at ERROR while it is attached."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def logged_errors(*logger_names: str) -> Iterator[ErrorLog]:
    log = ErrorLog()
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addHandler(log)
    try:
        yield log
    finally:
        for logger in loggers:
            logger.removeHandler(log)


def _traceback(exc_info: Any, message: str) -> str:
    """The message, the project's last frames and the exception."""
    frames = [
        f
        for f in traceback.extract_tb(exc_info[2])
        if f.filename.startswith(ROOT)
        and "/.venv/" not in f.filename
        and "site-packages" not in f.filename
    ]
    where = [f"  {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames[-6:]]
    what = traceback.format_exception_only(exc_info[0], exc_info[1])
    return "\n".join([message, *where, *what])


@dataclass
class Sent:
    """What was sent, for the failure message."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None

    def __str__(self) -> str:
        if isinstance(self.body, bytes):
            text: str | None = repr(self.body[:3000])
        else:
            text = self.body if isinstance(self.body, str) else json.dumps(self.body)
        if text is not None and len(text) > 3000:
            text = text[:3000] + f"... ({len(text)} chars)"
        return f"{self.method} {self.path}\nheaders: {self.headers}\nbody: {text}"


def assert_no_server_error(response: Any, sent: Sent, errors: ErrorLog) -> None:
    """The answer is below 500 and the server logged no exception while giving it (one it
    hid behind another answer counts too). Clears ``errors`` for the next request."""
    status = response.status_code
    logged = [
        (r.exc_info, r.getMessage())
        for r in errors.records
        if r.exc_info and r.exc_info[0] is not None
    ]
    errors.records.clear()
    if getattr(response, "exc_info", None):  # the test client's, for an unhandled one
        logged.append((response.exc_info, "raised"))
    if status >= 500 or logged:
        tracebacks = "\n".join(_traceback(e, m) for e, m in logged) or "(nothing logged)"
        raise AssertionError(
            f"answer {status} / logged exception for\n{sent}\n"
            f"answer body: {response.content[:500]!r}\n{tracebacks}"
        )


def wire(value: str) -> str:
    """A header value as WSGI hands it over: its UTF-8 bytes read as ISO-8859-1."""
    return value.encode("utf-8", "surrogatepass").decode("latin-1")


@contextmanager
def rolled_back() -> Iterator[None]:
    """One example's writes, undone at its end (a savepoint in the test's transaction)."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


# --------------------------------------------------------------------------- junk values


def junk_values(
    strings: Sequence[str], keys: Sequence[str], numbers: Sequence[int] = ()
) -> st.SearchStrategy[JSON]:
    """Any JSON: scalars (the ``strings`` and ``numbers`` given among them) and small lists
    and objects of them (keys from ``keys`` or random)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        *([st.sampled_from(list(numbers))] if numbers else []),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(list(strings)),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(list(keys)) | st.text(max_size=6), children, max_size=3
            )
        ),
        max_leaves=6,
    )


# --------------------------------------------------------------------------- mutations


def all_paths(doc: JSON, prefix: Path = ()) -> list[Path]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += all_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += all_paths(value, (*prefix, index))
    return found


def get_at(doc: JSON, path: Path) -> JSON:
    for step in path:
        doc = doc[step]
    return doc


def set_at(doc: JSON, path: Path, value: JSON) -> JSON:
    if not path:
        return value
    parent = get_at(doc, path[:-1])
    parent[path[-1]] = value
    return doc


def delete_at(doc: JSON, path: Path) -> JSON:
    if not path:
        return {}
    parent = get_at(doc, path[:-1])
    del parent[path[-1]]
    return doc


def ensure_path(doc: JSON, path: Path, value: JSON) -> JSON:
    """Set ``path`` (creating dicts on the way when the parent is missing)."""
    node = doc
    for step in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(step, {})
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return doc
    last = path[-1]
    if isinstance(node, list):
        if isinstance(last, int) and last < len(node):
            node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    return doc


@dataclass
class Pool:
    """Values that make sense somewhere in the request: ``fields`` maps a path to values to
    put there; ``references`` are real and junk FHIR reference strings (op "reference"),
    ``ids`` real ids of other objects and junk ids (op "id")."""

    fields: list[tuple[Path, list[JSON]]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    ids: list[JSON] = field(default_factory=list)


@dataclass(frozen=True)
class Mutations:
    """Up to ``most`` random mutations of a document, each drawn from ``ops``: drop a key,
    put ``junk`` or a value of the pool (``plausible``) somewhere, a reference or an id, an
    unknown key (from ``keys``), duplicate a list's first item, wrap a value in a list or
    unwrap one."""

    junk: st.SearchStrategy[JSON]
    keys: Sequence[str]
    ops: Sequence[str]

    def __call__(self, data: st.DataObject, doc: JSON, pool: Pool, most: int = 4) -> JSON:
        doc = copy.deepcopy(doc)
        count = data.draw(st.integers(min_value=0, max_value=most), label="mutations")
        for _ in range(count):
            op = data.draw(st.sampled_from(list(self.ops)), label="op")
            paths = all_paths(doc)
            if op == "plausible" and pool.fields:
                path, values = data.draw(st.sampled_from(pool.fields), label="field")
                value = data.draw(st.sampled_from(values), label="value")
                doc = ensure_path(doc, path, copy.deepcopy(value))
                continue
            if op == "reference":
                paths = [p for p in paths if p and p[-1] == "reference"] or paths
            path = data.draw(st.sampled_from(paths), label="path")
            target = get_at(doc, path)
            if op == "drop":
                doc = delete_at(doc, path)
            elif op in ("junk", "plausible"):
                doc = set_at(doc, path, data.draw(self.junk, label="junk"))
            elif op == "reference":
                ref = data.draw(st.sampled_from(pool.references), label="reference")
                wrapped = ref if path and path[-1] == "reference" else {"reference": ref}
                doc = set_at(doc, path, wrapped)
            elif op == "id":
                doc = set_at(doc, path, data.draw(st.sampled_from(pool.ids), label="id"))
            elif op == "unknown_key":
                if isinstance(target, dict):
                    key = data.draw(
                        st.sampled_from(list(self.keys)) | st.text(max_size=8), label="key"
                    )
                    target[key] = data.draw(self.junk, label="junk")
                else:
                    doc = set_at(doc, path, data.draw(self.junk, label="junk"))
            elif op == "duplicate":
                lists = [p for p in paths if isinstance(get_at(doc, p), list) and get_at(doc, p)]
                if lists:
                    chosen = get_at(doc, data.draw(st.sampled_from(lists), label="list"))
                    chosen.append(copy.deepcopy(chosen[0]))
            elif op == "wrap":
                doc = set_at(doc, path, [target])
            elif op == "unwrap":
                if isinstance(target, list):
                    doc = set_at(doc, path, target[0] if target else {})
                elif isinstance(target, dict) and target:
                    doc = set_at(doc, path, next(iter(target.values())))
        return doc
