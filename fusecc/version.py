"""The package version (one place: fusecc/__init__.py, the CLI and the tuning cache read it)."""

__version__ = "0.1.0"
