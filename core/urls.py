from django.urls import path

from core import web

urlpatterns = [
    path("", web.home, name="home"),
]
