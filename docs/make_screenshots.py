"""Screenshots for docs/cap-explorer.md, of the real pages, taken with Playwright and Chromium.

    .venv/bin/python docs/make_screenshots.py [--chromium /usr/bin/chromium]

1. ``kvstore explore --serve`` with all four modes: a majority partition made by clicks (select
   n1, press "Majority | minority"), the page once every mode's minority side has a verdict,
   and the counterexample panel when the checker has one.
2. ``kvstore explore`` on a small matrix (quorum under a majority partition): the report's
   section with the topology, the key placement and the counterexample.

(tests/test_ui_browser.py makes docs/images/cap-explorer-{healthy,partitioned,healed}.png when
run with KVSTORE_UI_SCREENSHOTS=docs/images.)  Every wait is bounded; the processes started here
are stopped by PID (SIGINT: the explorer heals and stops its own nodes).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

IMAGES = Path(__file__).resolve().parent / "images"


def _minority_total(page: Page, mode: str) -> int:
    return int(page.locator(f'.mode[data-mode="{mode}"] .side.minority').get_attribute("data-total") or 0)


def live_page(chromium: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "explore", "--serve", "--no-browser", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", proc.stdout.readline())
        assert found, "the explorer printed no URL"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(found.group(1))
            page.locator('#status[data-status="running"]').wait_for(timeout=180_000)
            page.wait_for_timeout(8000)  # some load before the fault, for the sparklines
            page.locator('#graph [data-node="n1"]').click()
            page.locator('#presets button[data-preset="majority"]').click()
            deadline = time.monotonic() + 120
            modes = ("eventual", "eventual-lww", "quorum", "linearizable")
            while time.monotonic() < deadline and min(_minority_total(page, m) for m in modes) < 20:
                page.wait_for_timeout(1000)
            page.locator('#key-buttons button[data-key="quorum.k0"]').click()
            page.wait_for_timeout(2000)
            page.screenshot(path=str(IMAGES / "cap-explorer-four-modes.png"), full_page=True)
            chip = page.locator('.chip[data-worst="invalid"]').first
            if chip.count():
                chip.click()
                page.locator("#counterexample-panel:not([hidden]) #ce-svg svg").wait_for(timeout=30_000)
                page.locator("#counterexample-panel").screenshot(path=str(IMAGES / "cap-explorer-counterexample.png"))
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def report(chromium: str) -> None:
    out = Path(tempfile.mkdtemp(prefix="kvstore-report-"))
    subprocess.run([sys.executable, "-m", "kvstore.cli", "explore", "--modes", "quorum", "--scenarios",
                    "majority-partition", "--duration", "6", "--seed", "11", "--out", str(out)],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1250, "height": 900})
        page.goto((out / "index.html").as_uri())
        page.locator("section#quorum--majority-partition").screenshot(
            path=str(IMAGES / "explore-report-pictures.png"))
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    IMAGES.mkdir(exist_ok=True)
    live_page(args.chromium)
    report(args.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
