"""The dashboard in headless Chromium: the page updates its curves and its worker table as the service moves on.

The service is the fake one (tests/fake_service.py), growing a digits-like
job while the page is open; the dashboard is the real server over HTTPS on
127.0.0.1, in an event loop of its own thread. The token is exchanged for the
cookie as a person would: one visit with ``?token=``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import chromium, curve_points, page_text, save_screenshot, wait_until, worker_rows
from conftest import _LoopThread
from dashboard_kit import make_kit, spki_pin
from fake_service import FakeService
from units import MS

from syncfed.net.dashboard import Dashboard, start_dashboard
from syncfed.net.web import https_tls

TOKEN = "browser-test-token-0123456789"
STEP = 10_000 * MS


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Dashboard, FakeService, _LoopThread, str]]:
    """A dashboard of a fake service with 12 of 40 rounds done, its loop, and its certificate's pin."""
    kit = make_kit(tmp_path)
    service = FakeService(rounds=40)
    service.grow(12)
    loop = _LoopThread()
    tls = https_tls(*kit.server, kit.ca, require_certificate=False)
    dashboard = loop.run(start_dashboard(service, host="127.0.0.1", port=0, tls=tls, token=TOKEN), STEP)
    try:
        yield dashboard, service, loop, spki_pin(kit.server[0])
    finally:
        loop.run(dashboard.close(), STEP)
        loop.close()


def test_the_page_shows_the_workers_and_live_curves_and_follows_the_job(
    served: tuple[Dashboard, FakeService, _LoopThread, str], tmp_path: Path
) -> None:
    dashboard, service, loop, pin = served

    async def grow() -> None:  # on the server's loop, between two of its answers
        service.grow(6)
        service.connect("dana")

    with chromium(pin) as browser:
        browser.get(f"{dashboard.url}?token={TOKEN}")
        assert browser.current_url == dashboard.url  # the token left the address bar
        wait_until(browser, lambda: curve_points(browser).get("federated") == 12, "12 federated points")
        rows = worker_rows(browser)
        assert list(rows) == ["alice", "bob", "charlie", "dana", "testing"]
        assert rows["dana"][2] == "disconnected, last seen 10 min ago"
        assert rows["alice"][4] == "digits train: 449 examples, digits 0-3"
        assert curve_points(browser) == {"federated": 12, "alice's model": 12, "bob's model": 12, "charlie's model": 12}
        assert curve_points(browser, "epsilon") == {"federation": 12}
        assert curve_points(browser, "seconds") == {"round time (s)": 12}
        assert page_text(browser, "#jobs tr[data-job='2'] td.number") == "12/40"

        loop.run(grow(), STEP)
        wait_until(browser, lambda: curve_points(browser).get("federated") == 18, "18 federated points")
        wait_until(browser, lambda: worker_rows(browser)["dana"][2].startswith("connected"), "dana connected")
        assert curve_points(browser, "epsilon") == {"federation": 18}
        assert page_text(browser, "#jobs tr[data-job='2'] td.number") == "18/40"
        assert page_text(browser, "#status").startswith("updated ")
        assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
        (shot, *_) = save_screenshot(browser, tmp_path / "dashboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(service.calls) == {"workers", "jobs", "metrics"}  # the page only read
