from __future__ import annotations

from typing import Any

from django.core.paginator import InvalidPage
from django.db.models import QuerySet
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.views import APIView


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def paginate_rows(
        self,
        queryset: QuerySet[Any],
        columns: tuple[str, ...],
        request: Request,
        view: APIView | None = None,
    ) -> list[tuple[Any, ...]]:
        """``paginate_queryset`` for list endpoints that build rows from tuples: the count
        runs on ``queryset`` itself (without the joins the columns need) and the page is
        read as ``values_list(*columns)`` (no model instances)."""
        self.request = request
        page_size = self.get_page_size(request) or self.page_size
        paginator = self.django_paginator_class(queryset, page_size)
        page_number = self.get_page_number(request, paginator)
        try:
            self.page = paginator.page(page_number)
        except InvalidPage as exc:
            raise NotFound(
                self.invalid_page_message.format(page_number=page_number, message=str(exc))
            ) from exc
        page_rows = self.page.object_list
        assert isinstance(page_rows, QuerySet)  # the sliced ``queryset``
        self.page.object_list = page_rows.values_list(*columns)
        return list(self.page)
