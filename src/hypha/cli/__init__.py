"""Command line interface (``hypha``)."""
