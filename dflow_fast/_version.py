"""The package version, in one place (setup.py reads it; build_info reports it)."""
__version__ = "0.1.0"
