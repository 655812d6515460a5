"""Reports opened in a real headless browser: Debian's chromium driven by Playwright. Tests that
need it are skipped, saying why, where either is missing."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest


@dataclasses.dataclass(frozen=True)
class LoadedPage:
    errors: list[str]  # console errors, page errors and failed requests
    images: list[tuple[str, bool, int]]  # every <img>: src, complete, natural width (0: broken)
    mean_rows: int  # rows of the table of means
    headers: list[str]  # its column headers

    @property
    def broken(self) -> list[str]:
        return [src for src, complete, width in self.images if not (complete and width > 0)]


def open_report(html: Path, screenshot: Path | None = None, width: int = 1280, height: int = 900) -> LoadedPage:
    """Load `html` in headless Chromium, wait for it, read what the tests check, and save a
    full-page screenshot to `screenshot` if given."""
    playwright = pytest.importorskip("playwright.sync_api", reason="no headless browser test: pip install playwright")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no headless browser test: Chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        rows = page.locator("#means tbody tr").count()
        headers = page.locator("#means thead th").all_inner_texts()
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return LoadedPage(errors, [tuple(i) for i in images], rows, headers)
