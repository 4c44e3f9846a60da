import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
application = get_wsgi_application()

# gunicorn runs no system checks: refuse settings that cannot work here, not at run time.
from core.checks import refuse_unworkable_settings  # noqa: E402

refuse_unworkable_settings()
