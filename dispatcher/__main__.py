"""``python -m dispatcher``: run the HTTP API with the settings from the environment."""

from dispatcher.app import serve_api
from shared.settings import get_settings

serve_api(get_settings())
