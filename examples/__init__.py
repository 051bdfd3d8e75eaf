"""Bundled example model and images (data only; see README.md)."""
