from __future__ import annotations

from typing import Any

from django.core.paginator import InvalidPage
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.views import APIView

from core.rows import QueryRows, SqlRows


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def paginate_rows(
        self, rows: QueryRows | SqlRows, request: Request, view: APIView | None = None
    ) -> list[tuple[Any, ...]]:
        """``paginate_queryset`` for list endpoints that build their output from tuples
        (``core.rows``): the count and the page are read without model instances."""
        self.request = request
        page_size = self.get_page_size(request) or self.page_size
        paginator = self.django_paginator_class(rows, page_size)  # type: ignore[arg-type]
        page_number = self.get_page_number(request, paginator)
        try:
            self.page = paginator.page(page_number)
        except InvalidPage as exc:
            raise NotFound(
                self.invalid_page_message.format(page_number=page_number, message=str(exc))
            ) from exc
        return list(self.page)
