"""Keep ``Facility.updated_at`` true to what a facility shows when a change reaches it
through another row: its parent deleted (``SET_NULL`` is a bulk UPDATE that skips
``auto_now``) or an administrative area of its address renamed. Readers that take "changed
since" by ``updated_at`` (the FHIR registry projection) would otherwise miss them."""

from __future__ import annotations

from typing import Any

from django.db.models import Q
from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver
from django.utils import timezone

from registry.models import AdministrativeArea, AreaLevel, Facility


@receiver(pre_delete, sender=Facility, dispatch_uid="registry.facility_children_touched")
def facility_children_touched(sender: Any, instance: Facility, **kwargs: Any) -> None:
    Facility.objects.filter(parent_id=instance.pk).update(updated_at=timezone.now())


@receiver(post_save, sender=AdministrativeArea, dispatch_uid="registry.area_facilities_touched")
def area_facilities_touched(
    sender: Any, instance: AdministrativeArea, created: bool, **kwargs: Any
) -> None:
    if created:  # no facility is in it yet
        return
    # The facilities in the area or below it (as many levels as AreaLevel has).
    below = Q(area_id=instance.pk) | Q(province_id=instance.pk)
    path = "area__parent"
    for _ in range(len(AreaLevel.choices) - 1):
        below |= Q(**{f"{path}_id": instance.pk})
        path += "__parent"
    Facility.objects.filter(below).update(updated_at=timezone.now())
