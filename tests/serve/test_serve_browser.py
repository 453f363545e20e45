"""A real headless Chromium (Debian's, driven by Playwright) uploads a photo and reads the verdict.

Screenshots go to test-artifacts/. The test skips only when no Chromium binary is installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_util import photo

CHROMIUM = os.environ.get("MYCODIST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# No sandbox (root in CI), no GPU, and no calls home: this machine's network is closed.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MYCODIST_CHROMIUM)"),
]


def test_upload_shows_verdict_and_warning(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright  # a dev dependency: missing means a broken setup

    ARTIFACTS.mkdir(exist_ok=True)
    picture = tmp_path / "mushroom.jpg"
    picture.write_bytes(photo(size=(640, 480)))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(served)
            expect(page.locator("#warning")).to_contain_text("No photo identification makes a mushroom safe")
            page.get_by_label("Choose a photo").set_input_files(str(picture))  # the label is wired to the input
            expect(page.locator("#preview")).to_be_visible()
            page.get_by_role("button", name="Check this photo").click()
            expect(page.locator("#verdict-title")).to_have_text("Poisonous", timeout=30_000)
            expect(page.locator("#verdict-message")).to_contain_text("Test death cap")
            expect(page.locator("#top-k tbody tr")).to_have_count(5)
            expect(page.locator("#verdict-reasons")).to_contain_text("top_toxic:")
            expect(page.locator("#lookalikes")).to_be_visible()  # the death cap's edible lookalike, and its odds
            expect(page.locator("#lookalikes tbody tr")).to_have_count(1)
            expect(page.locator("#lookalikes tbody")).to_contain_text("Agaricus similis")
            expect(page.locator("#warning")).to_be_visible()
            assert page.evaluate("document.activeElement.id") == "verdict-title"  # focus moved to the answer
            page.screenshot(path=str(ARTIFACTS / "serve-upload-verdict.png"), full_page=True)
            assert errors == []

            # With JavaScript off, the same form posts to the server and gets a result page.
            nojs = browser.new_context(java_script_enabled=False).new_page()
            nojs.goto(served)
            nojs.locator("#image").set_input_files(str(picture))
            nojs.locator("#submit").click()
            expect(nojs.locator("#verdict-title")).to_have_text("Poisonous", timeout=30_000)
            expect(nojs.locator(".warning")).to_contain_text("No photo identification")
            expect(nojs.locator("#lookalikes tbody")).to_contain_text("Agaricus similis")
            nojs.screenshot(path=str(ARTIFACTS / "serve-no-javascript.png"), full_page=True)
        finally:
            browser.close()
