"""The `nfdm-de` command-line interface: the only place where strings become objects."""
