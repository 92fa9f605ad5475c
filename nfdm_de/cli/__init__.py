"""The `nfdm-de` command line, importable as `nfdm_de.cli`.

Its modules live in the repository's top-level `cli/` folder. A built wheel carries them in this
package (pyproject.toml's `force-include`); in a source checkout or an editable install this file
stands in for them and points the package's search path at that folder."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "cli")]
