"""Sphinx configuration for scellst."""

from importlib.metadata import version as _version

project = "scellst"
author = "scellst developers"
try:
    release = _version("scellst")
except Exception:  # noqa: BLE001 - building docs from a source tree
    release = "0.0.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
# ".rst" first: autosummary writes its stub pages with the first reST suffix, and MyST would print reST as text
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "scellst"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
}
