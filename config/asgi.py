import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
application = get_asgi_application()

# An ASGI server runs no system checks: refuse settings that cannot work here.
from core.checks import refuse_unworkable_settings  # noqa: E402

refuse_unworkable_settings()
