"""`python -m nfdm_de.cli`: the same as the `nfdm-de` console script."""

from .main import entry_point

entry_point()
