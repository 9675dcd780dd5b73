"""Sphinx configuration for the swav_ref course site.

Built offline with warnings as errors and every notebook executed afresh::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Equations render without a network: MathJax 3 is served from the site itself
(``sphinx-mathjax-offline`` copies it into ``_static/mathjax``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "swav_ref"
author = "the swav_ref team"
copyright = "2026, the swav_ref team"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
]

# The notebooks live in ../notebooks as jupytext py:percent files; the site renders the
# same files (copied in at build time, never edited here) and executes them every build.
_NOTEBOOKS_SRC = ROOT / "notebooks"
_NOTEBOOKS_DST = DOCS / "notebooks"
if _NOTEBOOKS_DST.exists():
    shutil.rmtree(_NOTEBOOKS_DST)
_NOTEBOOKS_DST.mkdir()
for _nb in sorted(_NOTEBOOKS_SRC.glob("[0-9][0-9]_*.py")):
    shutil.copy2(_nb, _NOTEBOOKS_DST / _nb.name)

nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "force"  # a cache keyed on the notebook alone would hide library breakage
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = False
nb_merge_streams = True
# Training's progress bars are Jupyter widgets where ipywidgets is installed (the `jupyter`
# package brings it). Their JavaScript would come from a CDN, which the offline site cannot
# reach, and a finished bar shows nothing anyway (it is cleared at the end of each epoch):
# load no widget JavaScript, so every page works offline.
nb_ipywidgets_js = {}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

source_suffix = {".md": "myst-nb", ".py": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "conf.py"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# Docstring sections beyond numpydoc's, rendered like Notes (a rubric and its text). Left
# unknown, a "Layouts" heading would become a section title that swallows the Parameters,
# Raises and Warns that follow it, and they would show as raw field names.
napoleon_custom_sections = ["Layouts"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# Every cross-reference must resolve (with -W, a dead one fails the build): a reference to
# a swav_ref object names the module that defines it (autodoc documents it there, not where
# it is re-exported), e.g. :func:`~swav_ref.ot.sinkhorn.sinkhorn_knopp`. The build is
# offline, so there is no intersphinx inventory; ignored are only the targets that cannot
# resolve without one, and the pieces of napoleon's free-text types ("array (n, m)").
nitpicky = True
nitpick_ignore_regex = [
    # Third-party libraries, in annotations and "Returns" types (matplotlib.figure.Figure,
    # numpy.ndarray, numpy.random.Generator, pandas.DataFrame).
    (r"py:.*", r"(numpy|matplotlib|pandas|mpi4py)(\..*)?"),
    # The standard library, in annotations (pathlib.Path, os.PathLike, types.ModuleType,
    # collections.abc.Sequence...); autodoc leaves a class's ``Path | None`` unqualified.
    (r"py:class", r"(pathlib|os|types|collections\.abc)\.\w+|Path"),
    # napoleon makes each word of a parameter's type a class reference: in "array (n, m)",
    # "int, optional", "0-d array", "(B, K) float array"... Not a dotted Python name at all
    # (a number, a shape, prose in parentheses):
    (r"py:class", r"(?![A-Za-z_]\w*(\.[A-Za-z_]\w*)*$).*"),
    # a lower-case word (array, sequence, callable, optional, dtype, float32, numpy, cupy,
    # shape symbols n, m, d, batch_size); swav_ref's classes are all CamelCase:
    (r"py:class", r"[a-z_][a-z0-9_]*"),
    # a shape symbol in capitals (N, K, D_in, H_out, N_train, K_h):
    (r"py:class", r"[A-Z][A-Z0-9]?(_\w+)?"),
]

html_theme = "sphinx_book_theme"
html_title = "swav_ref: SwAV from first principles"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
