from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from referrals.models import AuditEntry, Referral, ReferralEvent

EVENT_FIELDS = (
    "seq",
    "at",
    "action",
    "from_state",
    "to_state",
    "actor",
    "actor_side",
    "reason",
    "payload",
)


class ReferralEventInline(admin.TabularInline[ReferralEvent, Referral]):
    model = ReferralEvent
    extra = 0
    can_delete = False
    readonly_fields = fields = EVENT_FIELDS

    def has_add_permission(self, request: HttpRequest, obj: Referral | None = None) -> bool:
        return False  # the event log is append-only, and only services append


@admin.register(Referral)
class ReferralAdmin(admin.ModelAdmin[Referral]):
    # Read-only: state changes must go through services so that events are recorded.
    list_display = ["filler_id", "state", "priority", "requester_facility", "assigned_department"]
    list_filter = ["state", "priority", "mode"]
    search_fields = ["filler_id", "placer_value"]
    list_select_related = ["requester_facility", "assigned_department__facility"]
    inlines = [ReferralEventInline]

    def has_change_permission(self, request: HttpRequest, obj: Referral | None = None) -> bool:
        return False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Referral | None = None) -> bool:
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin[AuditEntry]):
    # Append-only: readable by superusers, never changed or deleted here.
    list_display = ["at", "user", "action", "object_type", "object_id", "referral_id", "ip_address"]
    list_filter = ["action", "object_type"]
    search_fields = ["=referral_id", "=object_id", "user__username", "request_id"]
    list_select_related = ["user"]
    date_hierarchy = "at"
    readonly_fields = [f.name for f in AuditEntry._meta.fields]

    def has_change_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False
