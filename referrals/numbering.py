"""Each referral numbers its own messages, consult notes and case files: 1, 2, 3, ...

The FHIR ids of their resources carry that number (``<filler id>-msg-<n>``), never the
database key, which would tell every member — a partner hospital across the border too —
how many messages, notes and files the whole network holds. Rows stored before migration
``referrals`` 0010 keep their database key as their number, so every id already sent to a
member still names the same resource; a referral's later rows continue above it.
"""

from __future__ import annotations

from django.db.models import Max

from referrals.models import Attachment, ConsultNote, Message, Referral

Numbered = type[Message] | type[ConsultNote] | type[Attachment]


def next_number(model: Numbered, referral: Referral) -> int:
    """The number of ``referral``'s next row of ``model``.

    Call it in the transaction that inserts the row, with the referral's row locked
    (``select_for_update``; ``lock_referral`` when the caller has not): the lock makes the
    read and the insert one step for concurrent writers, and the unique constraint
    (referral, number) refuses anything that slips past it."""
    return last_number(model, referral) + 1


def last_number(model: Numbered, referral: Referral) -> int:
    """The highest number of ``referral``'s rows of ``model`` (0: none): in the transaction
    that inserted one under the referral's lock, that row's."""
    found = model._default_manager.filter(referral=referral).aggregate(last=Max("number"))
    return int(found["last"] or 0)


def lock_referral(referral: Referral) -> Referral:
    """Hold ``referral``'s row lock until the transaction ends (on SQLite, whose writers
    already take turns, a plain read): the row as it is once locked, for the caller to
    check again what it checked before waiting."""
    return Referral.objects.select_for_update().get(pk=referral.pk)
