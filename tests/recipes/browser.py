"""Opens a page from disk in a real headless Chromium (Debian's ``chromium``, driven by
playwright with ``executable_path``: no browser download) and reports what it rendered.

``make browser`` installs Debian's package where apt runs as root (CI runs it before
``make test``, which never runs apt itself); without it the tests that need it are skipped
with one line saying how to get it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import system_packages

WIDTH = 1280


@dataclass
class Rendered:
    """What the browser saw: console errors and page errors, requests that left the disk, every
    ``<img>`` (loaded, natural width and height, alt text), the page text and a screenshot."""

    errors: list[str] = field(default_factory=list)
    remote_requests: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    screenshot: Path | None = None


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    system_packages.require("chromium", path is not None, "opening the pages in a real browser")
    return path


def render(page: Path, screenshot: Path) -> Rendered:
    """Open ``page`` (a file) at 1280 px wide, wait for it to load, take a full-page screenshot."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    rendered = Rendered(screenshot=screenshot)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": WIDTH, "height": 900})
            tab.on(
                "console",
                lambda m: rendered.errors.append(m.text) if m.type == "error" else None,
            )
            tab.on("pageerror", lambda error: rendered.errors.append(str(error)))
            tab.on(
                "request",
                lambda r: (
                    rendered.remote_requests.append(r.url)
                    if not r.url.startswith(("file:", "data:"))
                    else None
                ),
            )
            tab.goto(page.resolve().as_uri(), wait_until="load")
            rendered.images = tab.evaluate(
                "Array.from(document.images).map(i => ({complete: i.complete, "
                "width: i.naturalWidth, height: i.naturalHeight, alt: i.alt}))"
            )
            rendered.text = tab.inner_text("body")
            tab.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return rendered


def assert_rendered_pictures(rendered: Rendered, minimum_images: int) -> None:
    """No errors, nothing fetched from a network, every picture decoded, a screenshot of the
    expected width that is not blank."""
    from PIL import Image, ImageStat

    assert rendered.errors == []
    assert rendered.remote_requests == []
    assert len(rendered.images) >= minimum_images
    for picture in rendered.images:
        assert picture["complete"] and picture["width"] > 100 and picture["height"] > 100, picture
    shot = Image.open(rendered.screenshot).convert("RGB")
    assert shot.size[0] == WIDTH and shot.size[1] > 900
    assert max(ImageStat.Stat(shot).stddev) > 20  # not one flat colour
    assert len(set(shot.resize((320, shot.size[1] // 4)).getdata())) > 500  # plots, not text only
