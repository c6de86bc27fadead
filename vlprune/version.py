"""The package version (one place: the package, its config stamps and the build read it)."""

__version__ = "0.1.0"
