"""Data preparation: fetching and converting the real chest CTs."""
