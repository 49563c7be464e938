"""The package version, in one place (read by the package and written into stack descriptions)."""

__version__ = "0.1.0"
