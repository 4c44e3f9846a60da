"""Keyset paging for searches: a ``next`` link carries ``_cursor``, the sort values of the
last row it followed (the ``_sort`` keys, then the type's own order as the tie-break), and
the next page is the rows after those values in the same order.

With offsets alone a worklist that accepts the referrals it has just seen moves every
later one up a page: following ``next`` (``_offset=50``) skipped as many referrals as it
had handled. After a cursor nothing is skipped or shown twice: a referral that leaves the
matches is simply not there, one that arrives before the cursor waits for the next
search from the start. The values are captured when the page is read, so a row whose own
sort value changes (``_lastUpdated``) does not move the cursor.

The token is signed (``django.core.signing``, the secret key) and names the search it
was made for (resource type and sort): a cursor we did not give out, or one of another
search, is 400, so its values always have the types the statement compares them with.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.core import signing
from django.db.models import Q

from fhir_gateway.outcomes import FhirError

MAX_CURSOR_LENGTH = 2048
_SALT = "consilium.fhir.cursor"
_FALSE = Q(pk__in=[])


def encode_cursor(search: str, values: Sequence[Any]) -> str:
    """A ``_cursor`` for ``search`` (what it was made for: type and sort) after ``values``."""
    tagged: list[list[Any]] = []
    for value in values:
        if value is None:
            tagged.append(["n"])
        elif isinstance(value, datetime):
            tagged.append(["d", value.isoformat()])
        elif isinstance(value, bool):  # before int: bool is one
            raise TypeError("no boolean sort keys")
        elif isinstance(value, int):
            tagged.append(["i", value])
        elif isinstance(value, float):  # a distance: JSON keeps every bit (repr)
            tagged.append(["f", value])
        else:
            tagged.append(["s", str(value)])
    return signing.dumps([search, tagged], salt=_SALT, compress=True)


def decode_cursor(token: str, search: str) -> list[Any]:
    """The values of a ``_cursor`` this server gave out for ``search``; anything else
    is 400."""

    def invalid(why: str) -> FhirError:
        return FhirError(
            400,
            "invalid",
            f"_cursor is not one this server gave out for this search ({why}); start the "
            "search again.",
            expression=["_cursor"],
        )

    if len(token) > MAX_CURSOR_LENGTH:
        raise invalid("too long")
    try:
        made_for, tagged = signing.loads(token, salt=_SALT)
    except (signing.BadSignature, ValueError, TypeError) as exc:
        raise invalid("not ours") from exc
    if made_for != search:
        raise invalid("another search")
    values: list[Any] = []
    for item in tagged:
        match item:
            case ["n"]:
                values.append(None)
            case ["d", str(text)]:
                values.append(datetime.fromisoformat(text))
            case ["i", int(number)]:
                values.append(number)
            case ["f", float(number)]:
                values.append(number)
            case ["s", str(text)]:
                values.append(text)
            case _:  # signed by us: cannot happen
                raise invalid("a bad value")
    return values


def after_q(keys: Sequence[tuple[str, bool]], values: Sequence[Any]) -> Q:
    """The rows after ``values`` in the order of ``keys`` ((field or alias, descending),
    NULLS LAST, the last key never null) as an ORM condition."""
    condition = _FALSE
    equal = Q()
    for (name, descending), value in zip(keys, values, strict=True):
        if value is None:  # NULLS LAST: nothing is after a null but its ties
            later, same = _FALSE, Q(**{f"{name}__isnull": True})
        else:
            later = Q(**{f"{name}__{'lt' if descending else 'gt'}": value}) | Q(
                **{f"{name}__isnull": True}
            )
            same = Q(**{name: value})
        condition |= equal & later
        equal &= same
    return condition


def after_sql(keys: Sequence[tuple[str, bool]], values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``after_q`` in SQL over expressions (the hand-written search's ``sort_sql``)."""
    alternatives: list[str] = []
    params: list[Any] = []
    equal: list[str] = []
    equal_params: list[Any] = []
    for (expression, descending), value in zip(keys, values, strict=True):
        if value is None:
            same, same_params = f"{expression} IS NULL", []
        else:
            op = "<" if descending else ">"
            alternatives.append(
                "("
                + " AND ".join([*equal, f"({expression} {op} %s OR {expression} IS NULL)"])
                + ")"
            )
            params += [*equal_params, value]
            same, same_params = f"{expression} = %s", [value]
        equal.append(same)
        equal_params += same_params
    return ("(" + " OR ".join(alternatives) + ")" if alternatives else "FALSE"), params
