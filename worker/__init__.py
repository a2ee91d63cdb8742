"""The render side: a thin Celery shell over a plain pipeline over frames | models | runtime."""
