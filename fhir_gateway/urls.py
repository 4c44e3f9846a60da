"""Routes under /fhir (included as ``^fhir(?:/|$)``: patterns start after "/fhir/")."""

from django.urls import re_path

from fhir_gateway import views

_TYPE = r"(?P<resource_type>[^/]+)"
_ID = r"(?P<logical_id>[^/]+)"
_OP = r"\$(?P<operation>[A-Za-z][A-Za-z0-9-]*)"

app_name = "fhir"
urlpatterns = [
    re_path(r"^$", views.root, name="root"),
    re_path(r"^metadata/?$", views.metadata, name="metadata"),
    re_path(r"^\$versions/?$", views.versions, name="versions"),
    re_path(r"^_async/(?P<job_id>[^/]+)/?$", views.async_status, name="async-status"),
    re_path(rf"^{_OP}/?$", views.system_operation, name="system-operation"),
    re_path(rf"^{_TYPE}/{_OP}/?$", views.type_operation, name="type-operation"),
    re_path(rf"^{_TYPE}/{_ID}/{_OP}/?$", views.instance_operation, name="instance-operation"),
    re_path(rf"^{_TYPE}/?$", views.type_level, name="type"),
    re_path(rf"^{_TYPE}/_search/?$", views.search_post, name="search"),
    re_path(rf"^{_TYPE}/{_ID}/?$", views.instance, name="instance"),
    re_path(rf"^{_TYPE}/{_ID}/_history/?$", views.history, name="history"),
    re_path(rf"^{_TYPE}/{_ID}/_history/(?P<version_id>[^/]+)/?$", views.vread, name="vread"),
    re_path(r"^(?P<rest>[\s\S]*)$", views.unknown, name="unknown"),  # newlines too
]
