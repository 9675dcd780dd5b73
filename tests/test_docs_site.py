"""The course site builds offline and renders in a real browser.

The site is built once per session (or taken from ``SWAV_REF_DOCS_HTML`` when ``.ci/run``
has already built it). A headless Chromium then opens pages, takes screenshots, and we
check that the equations rendered (MathJax produced its output elements), that every
figure loaded, and that every internal link resolves to a file in the build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import required

from required import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    built = os.environ.get("SWAV_REF_DOCS_HTML")
    if built:
        path = Path(built)
        assert (path / "index.html").exists(), f"SWAV_REF_DOCS_HTML={built} holds no index.html"
        return path
    required.module("myst_nb")
    out = tmp_path_factory.mktemp("site") / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(out)]
    # no MPLBACKEND=Agg here: the notebooks' figures must come out inline
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"docs build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            self.srcs.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.srcs.append(attrs["href"])


def test_site_has_every_page(site):
    for page in ["index.html", "install.html", "math.html", "architecture.html", "api.html", "results.html"]:
        assert (site / page).exists(), page
    notebooks = sorted((site / "notebooks").glob("*.html"))
    assert len(notebooks) == 6, notebooks


def test_mathjax_is_served_locally(site):
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
    html = (site / "math.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in html
    assert "cdn.jsdelivr" not in html


def test_every_script_and_stylesheet_is_served_by_the_site(site):
    """Offline, a script from a CDN fails to load (notebooks with progress-bar widgets once
    pulled require.js and the widget manager from two of them)."""
    remote = []
    for page in site.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        remote += [f"{page.relative_to(site)}: {src}" for src in parser.srcs if re.match(r"^(https?:)?//", src)]
    assert not remote, remote[:10]


def test_internal_links_resolve(site):
    broken = []
    for page in site.rglob("*.html"):
        if "_static" in page.relative_to(site).parts:
            continue  # the theme's Jinja macro templates, copied as static files, are no pages
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        for ref in parser.hrefs + parser.srcs:
            if re.match(r"^(https?:|mailto:|data:|javascript:|#)", ref):
                continue
            target = unquote(urlsplit(ref).path)  # without ?v=... and #anchor
            if not target:
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(site)} -> {ref}")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:50])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _require_browser() -> str:
    exe = _chromium()
    if exe is None:
        skip_or_fail("Chromium", "SWAV_REF_REQUIRE_BROWSER", "headless Chromium not installed (apt-get install chromium)")
    return exe


def _browser(exe, tmp_path, *args):
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
        "--disable-background-networking", "--disable-sync", "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("page", ["index.html", "math.html", "notebooks/03_swav_codes_and_loss.html"])
def test_page_renders_in_chromium(site, tmp_path, page):
    exe = _require_browser()
    url = (site / page).as_uri()
    dom = _browser(exe, tmp_path, "--dump-dom", url).stdout
    assert "<html" in dom.lower(), f"Chromium returned no DOM for {page}"
    # MathJax 3 replaces TeX by <mjx-container> elements once it has run.
    assert "mjx-container" in dom, f"equations did not render on {page}"
    assert "<mjx-merror" not in dom, f"MathJax reported a TeX error on {page}"
    shot = ROOT / "docs" / "_build" / "screenshots"
    shot.mkdir(parents=True, exist_ok=True)
    png = shot / (page.replace("/", "_").replace(".html", ".png"))
    _browser(exe, tmp_path, f"--screenshot={png}", "--window-size=1280,1600", url)
    assert png.exists() and png.stat().st_size > 10_000, f"no screenshot of {page}"


def test_figures_load_in_chromium(site, tmp_path):
    """Every <img> on a notebook page has loaded (naturalWidth > 0) in the browser."""
    exe = _require_browser()
    page = site / "notebooks" / "01_optimal_transport_desserts.html"
    # Inject a checker into a copy of the page that writes the image status into the DOM.
    html = page.read_text()
    checker = (
        "<script>window.addEventListener('load', function () {"
        "const imgs = Array.from(document.images);"
        "const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);"
        "const d = document.createElement('div'); d.id = 'img-report';"
        "d.textContent = 'IMAGES ' + imgs.length + ' BROKEN ' + bad.length + ' ' + bad.join(' ');"
        "document.body.appendChild(d);});</script></body>"
    )
    copy = page.with_name("_imgcheck.html")
    copy.write_text(html.replace("</body>", checker, 1))
    try:
        dom = _browser(exe, tmp_path, "--dump-dom", copy.as_uri()).stdout
    finally:
        copy.unlink()
    m = re.search(r"IMAGES (\d+) BROKEN (\d+)([^<]*)", dom)
    assert m, "the image checker did not run"
    assert int(m.group(1)) >= 2, "expected figures on the dessert notebook page"
    assert int(m.group(2)) == 0, f"figures failed to load: {m.group(3)}"
