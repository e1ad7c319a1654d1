"""The dashboard's HTTPS endpoints without a browser: who gets in, the token cookie, the state JSON, the headers."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from dashboard_kit import Kit, make_kit
from fake_service import FakeService
from units import MS

from syncfed.exceptions import ConfigError, UnknownJob
from syncfed.net.dashboard import COOKIE, start_dashboard
from syncfed.net.transport import server_tls
from syncfed.net.web import https_tls
from syncfed.service_api import WorkerRecord

TOKEN = "a-local-token-0123456789"
TIMEOUT = 10_000 * MS


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return make_kit(tmp_path_factory.mktemp("dashboard"))


def client_tls(kit: Kit, identity: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(kit.ca))
    if identity is not None:
        context.load_cert_chain(*identity)
    return context


Scenario = Callable[[str, FakeService], Awaitable[Any]]


def serving(
    kit: Kit, scenario: Scenario, *, token: str | None = TOKEN, service: FakeService | None = None, **settings: Any
) -> Any:
    """Run ``scenario(url, service)`` against a dashboard on a free port of 127.0.0.1."""
    service = service or FakeService()

    async def run() -> Any:
        async with asyncio.timeout(TIMEOUT):
            tls = https_tls(*kit.server, kit.ca, require_certificate=False)
            dashboard = await start_dashboard(service, host="127.0.0.1", port=0, tls=tls, token=token, **settings)
            try:
                return await scenario(dashboard.url, service)
            finally:
                await dashboard.close()

    return asyncio.run(run())


async def get(url: str, context: ssl.SSLContext, **headers: str) -> tuple[int, dict[str, str], str, list[str]]:
    """Status, headers, body and Set-Cookie lines of one GET, redirects not followed, no cookie jar."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            return (
                response.status,
                dict(response.headers),
                await response.text(),
                response.headers.getall("Set-Cookie", []),
            )


def test_without_a_token_or_an_admin_certificate_every_path_is_401(kit: Kit) -> None:
    async def scenario(url: str, service: FakeService) -> list[tuple[int, str]]:
        answers = []
        for path, identity in [
            ("", None),
            ("api/state", None),
            ("static/chart.js", None),
            ("api/state", kit.worker),
            ("api/state?token=wrong-token-0123456789", None),
        ]:
            status, headers, body, _ = await get(url + path, client_tls(kit, identity))
            assert headers["X-Content-Type-Options"] == "nosniff"
            answers.append((status, body))
        return answers

    answers = serving(kit, scenario)
    assert {status for status, _ in answers} == {401}
    assert answers[0][1] == "unauthorized: present a viewer certificate or the dashboard's token\n"


def test_a_certificate_from_another_ca_is_refused_in_the_handshake(kit: Kit) -> None:
    async def scenario(url: str, service: FakeService) -> None:
        with pytest.raises(aiohttp.ClientError):
            await get(url + "api/state", client_tls(kit, kit.stranger))

    serving(kit, scenario)


def test_the_token_is_swapped_once_for_a_strict_httponly_secure_cookie(kit: Kit) -> None:
    async def scenario(url: str, service: FakeService) -> tuple[Any, ...]:
        context = client_tls(kit)
        status, headers, _, cookies = await get(f"{url}?token={TOKEN}", context)
        assert (status, headers["Location"]) == (303, "/")
        (cookie,) = cookies
        value = cookie.split(";")[0].removeprefix(f"{COOKIE}=")
        assert TOKEN not in cookie
        with_cookie = await get(url + "api/state", context, Cookie=f"{COOKIE}={value}")
        other = "1" if value.endswith("0") else "0"  # a hex digest ends in 0 one time in 16: then it is no forgery
        forged = await get(url + "api/state", context, Cookie=f"{COOKIE}={value[:-1]}{other}")
        return cookie, with_cookie[0], forged[0]

    cookie, with_cookie, forged = serving(kit, scenario)
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attributes
    assert (with_cookie, forged) == (200, 401)


@pytest.mark.parametrize("who", ["viewer", "project_admin"])
def test_an_admin_certificate_gets_in_without_a_token(kit: Kit, who: str) -> None:
    async def scenario(url: str, service: FakeService) -> tuple[int, str]:
        status, headers, body, _ = await get(url, client_tls(kit, getattr(kit, who)))
        return status, headers["Content-Type"]

    assert serving(kit, scenario, token=None) == (200, "text/html; charset=utf-8")


def test_the_state_holds_workers_jobs_and_the_running_jobs_curves_and_the_service_is_only_read(kit: Kit) -> None:
    service = FakeService(rounds=40)
    service.grow(3)

    async def scenario(url: str, service: FakeService) -> Any:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(kit, kit.viewer))) as session:
            async with session.get(url + "api/state") as response:
                assert response.status == 200
                return await response.json()

    state = serving(kit, scenario, service=service)
    assert set(state) == {"time", "workers", "jobs", "curves"}
    assert [worker["id"] for worker in state["workers"]] == ["alice", "bob", "charlie", "dana", "testing"]
    assert [(job["id"], job["state"], job["round"], job["rounds"]) for job in state["jobs"]] == [
        ("2", "running", 3, 40),
        ("1", "done", 40, 40),
    ]
    assert list(state["curves"]) == ["2"]  # only the running job's
    curves = state["curves"]["2"]
    assert curves["metric"] == "accuracy"
    assert [line["name"] for line in curves["scores"]] == [
        "federated",
        "alice's model",
        "bob's model",
        "charlie's model",
    ]
    assert [len(line["points"]) for line in curves["scores"] + curves["seconds"] + curves["epsilon"]] == [3] * 6
    assert set(service.calls) == {"workers", "jobs", "metrics"}


class Failing(FakeService):
    """A service that cannot list its workers, or takes too long to."""

    def __init__(self, delay: float | None) -> None:
        super().__init__()
        self.delay = delay

    async def workers(self) -> list[WorkerRecord]:
        if self.delay is None:
            raise UnknownJob("the job store is locked")
        await asyncio.sleep(self.delay)
        return []


@pytest.mark.parametrize(
    ("delay", "error"), [(None, "the job store is locked"), (1.0, "the service did not answer in 0.05 s")]
)
def test_a_failing_or_stalled_service_is_answered_503_with_one_line(kit: Kit, delay: float | None, error: str) -> None:
    async def scenario(url: str, service: FakeService) -> tuple[int, str]:
        status, _, body, _ = await get(url + "api/state", client_tls(kit, kit.viewer))
        return status, json.loads(body)["error"]

    assert serving(kit, scenario, service=Failing(delay), state_timeout=0.05) == (503, error)


def test_the_state_lists_at_most_max_jobs_newest_first(kit: Kit) -> None:
    async def scenario(url: str, service: FakeService) -> list[str]:
        _, _, body, _ = await get(url + "api/state", client_tls(kit, kit.viewer))
        return [job["id"] for job in json.loads(body)["jobs"]]

    assert serving(kit, scenario, max_jobs=1) == ["2"]


def test_every_answer_forbids_framing_inline_script_and_other_origins(kit: Kit) -> None:
    async def scenario(url: str, service: FakeService) -> list[dict[str, str]]:
        context = client_tls(kit, kit.viewer)
        return [(await get(url + path, context))[1] for path in ("", "static/dashboard.js", "static/../setup.cfg")]

    page, script, missing = serving(kit, scenario)
    policy = page["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert "http" not in policy and "unsafe" not in policy
    assert script["Content-Type"] == "text/javascript; charset=utf-8"
    assert missing["X-Frame-Options"] == "DENY"


def test_the_page_loads_nothing_from_another_origin_and_no_inline_script() -> None:
    from importlib import resources

    static = resources.files("syncfed.net") / "static"
    page = (static / "index.html").read_text()
    assert "<script>" not in page and "style=" not in page
    for name in ("index.html", "dashboard.js", "chart.js", "dashboard.css", "favicon.svg"):
        text = (static / name).read_text()
        assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", ""), name


def test_a_dashboard_nobody_could_enter_or_with_a_guessable_token_is_refused(kit: Kit) -> None:
    no_client_certificates = server_tls(*kit.server, None)

    async def start(tls: ssl.SSLContext, token: str | None) -> None:
        await start_dashboard(FakeService(), host="127.0.0.1", port=0, tls=tls, token=token)

    with pytest.raises(ConfigError, match="^the dashboard needs a token or a tls context that asks for client"):
        asyncio.run(start(no_client_certificates, None))
    with pytest.raises(ConfigError, match="^dashboard token of 15 characters is shorter than 16$"):
        asyncio.run(start(no_client_certificates, "x" * 15))
