from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from accounts.forms import AdminLoginForm
from accounts.models import ApiToken, User
from accounts.services import api_tokens_revoke

admin.site.login_form = AdminLoginForm


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    fieldsets = (
        *(BaseUserAdmin.fieldsets or ()),
        ("Consilium", {"fields": ("facility", "departments")}),
    )
    list_display = ("username", "email", "facility", "is_active", "is_staff")
    list_select_related = ("facility",)
    autocomplete_fields = ("facility",)
    filter_horizontal = ("groups", "user_permissions", "departments")

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            # A deactivated account's tokens end with it: reactivating it later does not
            # bring back credentials issued before (issue new ones).
            api_tokens_revoke(user=obj)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = (
        "prefix",
        "user",
        "name",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    )
    list_select_related = ("user",)
    # A token is never moved to another user, extended or un-revoked: revoke it (the
    # action below) and issue a new one.
    readonly_fields = (
        "prefix",
        "user",
        "key_hash",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    )
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())

    def has_add_permission(self, request: HttpRequest) -> bool:
        return (
            False  # tokens are issued with `manage.py issue_token` so the raw value is shown once
        )
