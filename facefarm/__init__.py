"""FaceFarm's public surface: the FarmClient and the ``facefarm`` CLI."""
