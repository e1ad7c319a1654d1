"""Headless Chromium for the dashboard's tests, and what they read off the page.

Debian's ``chromium`` and ``chromium-driver`` are driven with selenium, the
dashboard's certificate pinned by its public key (Chromium's
``--ignore-certificate-errors-spki-list``) rather than all certificate errors
ignored. Any dashboard will do, the fake service's or a real ``serve``'s::

    with chromium(spki_pin(cert)) as browser:
        browser.get(f"{url}?token={token}")
        wait_until(browser, lambda: curve_points(browser)["federated"] >= 3)

A missing Chromium fails the test with a line saying how to install it: it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from units import MS

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "chromium",
    "curve_points",
    "page_text",
    "save_screenshot",
    "wait_until",
    "worker_rows",
]

CHROMIUM = os.environ.get("SYNCFED_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SYNCFED_CHROMEDRIVER", "/usr/bin/chromedriver")

#: How long the page may take to show what a test waits for (it polls every 1.5 s).
PAGE_TIMEOUT = 20_000 * MS


@contextlib.contextmanager
def chromium(pin: str, *, size: tuple[int, int] = (1280, 900)) -> Iterator[webdriver.Chrome]:
    """A headless Chromium that trusts the certificate whose public key ``pin`` names, and no other error."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver"
            " (apt-get install -y chromium chromium-driver; .ci/run does) to test the dashboard",
            pytrace=False,
        )
    profile = tempfile.TemporaryDirectory(prefix="syncfed-chromium-")  # else each run leaves one in /tmp
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        f"--user-data-dir={profile.name}",
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--window-size={size[0]},{size[1]}",
        f"--ignore-certificate-errors-spki-list={pin}",
        *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium's sandbox refuses to run as root
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        browser.set_page_load_timeout(PAGE_TIMEOUT)
        yield browser
    finally:
        browser.quit()
        profile.cleanup()


def wait_until(browser: webdriver.Chrome, condition: Callable[[], object], what: str = "") -> None:
    """Poll ``condition`` until it holds, at most :data:`PAGE_TIMEOUT` seconds; fail with the page's status line."""
    deadline = time.monotonic() + PAGE_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            status = page_text(browser, "#status")
            pytest.fail(f"the page did not show {what or 'what was awaited'} in {PAGE_TIMEOUT:g} s (status: {status})")
        time.sleep(100 * MS)


def worker_rows(browser: webdriver.Chrome) -> dict[str, list[str]]:
    """The worker table: each worker's cells as the page shows them (read in one go: the page redraws)."""
    rows: dict[str, list[str]] = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#workers tbody tr')].map("
        "(row) => [row.dataset.worker, [...row.cells].map((cell) => cell.textContent)]));"
    )
    return rows


def curve_points(browser: webdriver.Chrome, chart: str = "scores") -> dict[str, int]:
    """How many points each line of the running jobs' ``chart`` (scores, seconds, epsilon) has on the page."""
    points: dict[str, int] = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll(`svg[data-chart='${arguments[0]}'] polyline`)].map("
        "(line) => [line.dataset.name, Number(line.dataset.points)]));",
        chart,
    )
    return points


def page_text(browser: webdriver.Chrome, selector: str) -> str:
    """The text of the first element ``selector`` finds, "" if none."""
    text: str = browser.execute_script(
        "const node = document.querySelector(arguments[0]); return node === null ? '' : node.textContent;", selector
    )
    return text


def save_screenshot(browser: webdriver.Chrome, path: Path) -> list[Path]:
    """The page as a PNG at ``path``, and at ``$SYNCFED_SCREENSHOT`` too when it names one."""
    paths = [path, *([Path(os.environ["SYNCFED_SCREENSHOT"])] if os.environ.get("SYNCFED_SCREENSHOT") else [])]
    for target in paths:
        if not browser.save_screenshot(str(target)):
            pytest.fail(f"chromium could not save a screenshot to {target}")
    return paths
