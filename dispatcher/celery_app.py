"""The dispatcher's Celery app (cpu queue: plan and merge); configured lazily from the settings.

``celery -A dispatcher.celery_app worker -Q cpu`` names this module. Nothing connects at import time:
the configuration is read from ``get_settings()`` the first time Celery asks for it.
"""

from __future__ import annotations

from celery import Celery

from shared.celery_config import celery_config
from shared.settings import get_settings

app = Celery("facefarm-dispatcher", include=["dispatcher.tasks"], set_as_current=False)
app.add_defaults(lambda: celery_config(get_settings(), role="cpu"))
