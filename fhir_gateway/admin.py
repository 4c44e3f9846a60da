from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from fhir_gateway.delivery import outbox_replay, outbox_retry
from fhir_gateway.models import FhirResource, IntakeJob, OutboxMessage


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin[OutboxMessage]):
    list_display = (
        "id",
        "aggregate_key",
        "seq",
        "resource_type",
        "logical_id",
        "version_id",
        "endpoint",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status_code",
        "delivered_at",
    )
    list_filter = ("status", "resource_type")
    search_fields = ("aggregate_key", "idempotency_key", "logical_id")
    list_select_related = ("endpoint",)
    ordering = ("-id",)
    readonly_fields = [f.name for f in OutboxMessage._meta.get_fields() if f.concrete]
    actions = ("retry_messages", "replay_messages")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    # Deleting a message that is still to be sent loses it (decision 1: nothing lost):
    # only dead ones (which release their aggregate) and delivered ones may be deleted
    # (Django's bulk delete asks this per message and refuses a selection holding any
    # other, deleting nothing).
    _DELETABLE = (OutboxMessage.Status.DEAD, OutboxMessage.Status.DELIVERED)

    def has_delete_permission(self, request: HttpRequest, obj: OutboxMessage | None = None) -> bool:
        if obj is not None and obj.status not in self._DELETABLE:
            return False
        return super().has_delete_permission(request, obj)

    # Actions change messages: the change permission, not the view one (Django offers an
    # action without ``permissions`` to everyone who may open the list).
    @admin.action(description="Retry now (dead or failed messages)", permissions=["change"])
    def retry_messages(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        done = sum(outbox_retry(message_id=m.pk) for m in queryset)
        self.message_user(request, f"{done} message(s) queued again.", messages.SUCCESS)

    @admin.action(description="Replay (send delivered messages again)", permissions=["change"])
    def replay_messages(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        chosen = list(queryset.order_by("seq").values_list("pk", flat=True))
        done = sum(outbox_replay(message_id=pk) is not None for pk in chosen)
        self.message_user(request, f"{done} message(s) queued for replay.", messages.SUCCESS)
        if done < len(chosen):
            self.message_user(
                request,
                f"{len(chosen) - done} not replayed: not delivered, its endpoint is not "
                "active, or a newer version of the resource went to that endpoint since "
                "(replaying it would set the member back).",
                messages.WARNING,
            )


@admin.register(FhirResource)
class FhirResourceAdmin(admin.ModelAdmin[FhirResource]):
    list_display = (
        "resource_type",
        "logical_id",
        "version_id",
        "last_updated",
        "fhir_version",
        "is_current",
        "deleted",
    )
    list_filter = ("resource_type", "is_current", "deleted")
    search_fields = ("logical_id",)
    readonly_fields = [f.name for f in FhirResource._meta.get_fields() if f.concrete]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(IntakeJob)
class IntakeJobAdmin(admin.ModelAdmin[IntakeJob]):
    """Asynchronous transaction Bundles (``Prefer: respond-async``): what is waiting, what
    was answered, and what failed unexpectedly (``last_error``)."""

    list_display = (
        "id",
        "user",
        "status",
        "result_status",
        "attempts",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "result_status")
    search_fields = ("id", "user__username")
    list_select_related = ("user",)
    ordering = ("-created_at",)
    readonly_fields = [f.name for f in IntakeJob._meta.get_fields() if f.concrete]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
