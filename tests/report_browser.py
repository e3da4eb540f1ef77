"""Headless Chromium for the report tests (and benchmarks/bench_reports.py): load a page from
disk, return its DOM after scripts ran, every console message, a screenshot and the load time.

Chromium (Debian's `chromium`, installed by `make setup`) logs each console message, script
error and Content-Security-Policy violation as an `INFO:CONSOLE` line on stderr with
--enable-logging=stderr; a report writes nothing to the console, so any such line is an error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars")
_CONSOLE = re.compile(r":CONSOLE[^\]]*\] (.*)$", re.M)


@dataclass
class LoadedPage:
    dom: str
    console: list[str]
    seconds: float
    screenshot: Path | None


def chromium_missing_reason() -> str | None:
    if CHROMIUM is None:
        return "LIVE TEST SKIPPED: chromium not installed (make setup installs Debian's chromium)"
    return None


def _run(arguments: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    with tempfile.TemporaryDirectory(prefix="guardian-chromium-") as profile:
        started = time.monotonic()
        result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *arguments],
                                capture_output=True, text=True, timeout=timeout_s)
        return result, time.monotonic() - started


def load(page: Path, screenshot: Path | None = None, width_px: int = 1300, height_px: int = 2400,
         timeout_s: float = 90) -> LoadedPage:
    """One Chromium run for the DOM (scripts run, virtual time lets onload handlers finish) and,
    when asked, the screenshot of the same load: Chromium's new headless mode (checked on Debian
    12's Chromium 156) takes both in one run, one cold Chromium start per page instead of two. An
    older Chromium that writes no screenshot alongside --dump-dom gets a second run for it."""
    url = Path(page).resolve().as_uri()
    arguments = ["--virtual-time-budget=3000", "--dump-dom", url]
    if screenshot is not None:
        Path(screenshot).unlink(missing_ok=True)
        arguments[:0] = [f"--window-size={width_px},{height_px}", f"--screenshot={screenshot}"]
    result, seconds = _run(arguments, timeout_s)
    console = _CONSOLE.findall(result.stderr)
    if screenshot is not None and not Path(screenshot).exists():
        shot, _ = _run([f"--window-size={width_px},{height_px}", f"--screenshot={screenshot}", url], timeout_s)
        console += _CONSOLE.findall(shot.stderr)
    if not result.stdout.strip():
        raise AssertionError(f"chromium returned no DOM (exit {result.returncode}): {result.stderr[-2000:]}")
    return LoadedPage(result.stdout, console, seconds, screenshot)


def render_seconds(page: Path, timeout_s: float = 120) -> float:
    """Wall time for Chromium to load the page and hand back its DOM (includes Chromium's start)."""
    return load(page, timeout_s=timeout_s).seconds


def non_blank_share(png: Path) -> float:
    """Share of screenshot pixels that differ from the most common colour (the background)."""
    from PIL import Image

    image = Image.open(png).convert("RGB").resize((325, 600))
    colours = image.getcolors(maxcolors=325 * 600)
    background = max(colours)[0]
    return 1.0 - background / (325 * 600)


class _KeyedCells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells: dict[str, str] = {}
        self._key: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        key = dict(attrs).get("data-key")
        if key:
            self._key, self._text = key, []

    def handle_data(self, data):
        if self._key:
            self._text.append(data)

    def handle_endtag(self, tag):
        if self._key and tag == "td":
            self.cells[self._key] = "".join(self._text).strip()
            self._key = None


def keyed_cells(dom: str) -> dict[str, str]:
    """data-key -> the text the reader sees in that cell."""
    parser = _KeyedCells()
    parser.feed(dom)
    return parser.cells


def shown_number(text: str) -> float:
    """The number a cell shows ('1,234.5' -> 1234.5)."""
    return float(text.replace(",", ""))


# Anything that would make the browser fetch from elsewhere (CSP would block it, and log that).
FETCH = re.compile(r"""(?:src|href|action)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", re.I)


def check_page(page: Path, tmp_path: Path, size_limit_bytes: int = 3_000_000) -> dict[str, str]:
    """Load PAGE in Chromium: no console message, a non-blank screenshot, under the size budget;
    returns the keyed cells as shown."""
    assert page.exists(), page
    assert page.stat().st_size < size_limit_bytes, page.stat().st_size
    text = page.read_text()
    assert not FETCH.search(text), FETCH.search(text).group(0)
    loaded = load(page, screenshot=tmp_path / f"{page.parent.name}.png")
    assert loaded.console == [], loaded.console
    assert non_blank_share(loaded.screenshot) > 0.05
    return keyed_cells(loaded.dom)
