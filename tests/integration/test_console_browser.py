"""The console in a real browser (Debian's chromium, driven by Playwright) on a real stack:
pages with real data, filters and keyset pages, the image shown, a limited role that cannot
see another namespace even by URL, live updates, and a replay that asks first and happens once.

With STAMPFLOW_CONSOLE_SCREENSHOTS=DIR the tests save screenshots of the main pages there
(scripts/console-screenshots writes docs/console/ that way).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stampflow.console.access import Credentials
from stampflow.testing.stack import fetch, wait_for
from tests.integration.console_stack import ACME, OTHER, World, console_world, workflow_id_of

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Dialog, Page

__all__ = ["console_world"]

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is missing: apt-get install -y chromium "
                              "chromium-driver (these tests use Debian's chromium, never a "
                              "downloaded one)"),
]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("STAMPFLOW_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright (no browser "
                    "download needed)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS,
                                          headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def world(console_world: World) -> World:
    return console_world


async def _context(browser: Browser, creds: Credentials) -> BrowserContext:
    return await browser.new_context(
        http_credentials={"username": creds.role, "password": creds.password},
        viewport={"width": 1280, "height": 860})


async def _page(browser: Browser, world: World, creds: Credentials) -> Page:
    return await (await _context(browser, creds)).new_page()


async def _shot(page: Page, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        await page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


async def _goto(page: Page, world: World, path: str) -> int:
    response = await page.goto(world.server.url + path)
    assert response is not None
    return response.status


async def _texts(page: Page, selector: str) -> list[str]:
    texts: list[str] = await page.eval_on_selector_all(
        selector, "els => els.map(e => e.textContent.trim())")
    return texts


async def _images_shown(page: Page, selector: str) -> list[int]:
    await page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(i => i.complete)", arg=selector)
    widths: list[int] = await page.eval_on_selector_all(
        selector, "imgs => imgs.map(i => i.naturalWidth)")
    return widths


async def test_pages_render_with_real_data(browser: Browser, world: World) -> None:
    page = await _page(browser, world, world.ops)
    try:
        assert await _goto(page, world, "/") == 200
        assert page.url.endswith("/namespaces")
        assert await _texts(page, "#namespaces tbody tr td:first-child") == [ACME, OTHER]
        acme = await page.get_attribute(f'#namespaces tr[data-namespace="{ACME}"] td:nth-child(2)',
                                        "class")
        assert acme == "num"
        cells = await _texts(page, f'#namespaces tr[data-namespace="{ACME}"] td')
        assert cells[1] == str(len(world.workflows[ACME])) and cells[3] == "1"
        bars = await page.locator(f'figure.chart[data-namespace="{ACME}"] rect').count()
        assert bars >= 1
        assert await page.locator(f'figure.chart[data-namespace="{ACME}"] rect.failed').count()
        await _shot(page, "namespaces")

        assert await _goto(page, world, "/workflows") == 200
        rows = await page.locator("#workflows tbody tr").count()
        assert rows == sum(len(w) for w in world.workflows.values())
        await _shot(page, "workflows")

        generation = world.workflow(ACME, "generation")
        assert await _goto(page, world, f"/workflows/{generation['workflow_id']}") == 200
        steps = await _texts(page, "#timeline li b")
        assert steps == ["received", "generating", "stamping", "completed"]
        assert await _images_shown(page, "#image") == [64]
        facts = await page.text_content("#generation")
        assert facts is not None and "a console test picture 11" in facts and "tiny" in facts
        await _shot(page, "workflow-generation")

        stamp = next(w for w in world.workflows[ACME]
                     if w["kind"] == "stamp" and w["outcome"] == "stamped")
        assert await _goto(page, world, f"/workflows/{stamp['workflow_id']}") == 200
        text = await page.text_content("#stamp")
        assert text is not None and stamp["hash"] in text and "stampflow verify" in text
        await _shot(page, "workflow-stamp")

        assert await _goto(page, world, "/images") == 200
        assert await _images_shown(page, "#gallery img") == [64, 64]
        await _shot(page, "images")

        assert await _goto(page, world, "/failures") == 200
        assert await _texts(page, "#failures tbody td:nth-child(4)") == ["outside_root"]
        await _shot(page, "failures")
    finally:
        await page.context.close()


async def test_filters_and_keyset_pages_in_the_browser(browser: Browser, world: World) -> None:
    page = await _page(browser, world, world.ops)
    try:
        assert await _goto(page, world, "/workflows?limit=3") == 200
        seen: list[str] = []
        while True:
            seen += [str(x) for x in await page.eval_on_selector_all(
                "#workflows tbody tr", "rows => rows.map(r => r.dataset.workflow)")]
            older = page.locator("#next-page")
            if not await older.count():
                break
            await older.click()
            await page.wait_for_load_state()
        everything = await fetch(world.database_url,
                                 "SELECT workflow_id::text AS id FROM workflows "
                                 "ORDER BY created_at DESC, workflow_id DESC")
        assert seen == [r["id"] for r in everything]

        assert await _goto(page, world, "/workflows") == 200
        await page.select_option('select[name="namespace"]', OTHER)
        await page.select_option('select[name="kind"]', "generation")
        await page.click('#filters button[type="submit"]')
        await page.wait_for_load_state()
        assert "namespace=other" in page.url and "kind=generation" in page.url
        shown = await _texts(page, "#workflows tbody td:nth-child(2)")
        assert shown == [OTHER]
        # A bad value typed into the URL is one line, 400, not a 500.
        assert await _goto(page, world, "/workflows?state=exploded") == 400
        body = await page.text_content("body")
        assert body is not None and body.strip().startswith("bad request: state:")
    finally:
        await page.context.close()


async def test_a_limited_role_sees_only_its_namespace_even_by_url(browser: Browser,
                                                                  world: World) -> None:
    page = await _page(browser, world, world.limited)
    try:
        assert await _goto(page, world, "/namespaces") == 200
        assert await _texts(page, "#namespaces tbody tr td:first-child") == [ACME]
        assert await page.locator(f'figure.chart[data-namespace="{OTHER}"]').count() == 0
        assert await page.locator('nav a[href="/dead-letters"]').count() == 0
        assert await _goto(page, world, "/workflows") == 200
        assert set(await _texts(page, "#workflows tbody td:nth-child(2)")) == {ACME}
        assert await _goto(page, world, "/images") == 200
        assert await _images_shown(page, "#gallery img") == [64]
        hashes = await page.eval_on_selector_all("#gallery figure",
                                                 "fs => fs.map(f => f.dataset.hash)")
        assert hashes == [world.images[ACME]]
        foreign = world.workflow(OTHER, "generation")
        assert await _goto(page, world, f"/workflows/{foreign['workflow_id']}") == 404
        assert await _goto(page, world, f"/artifacts/{world.images[OTHER]}.png") == 404
        assert await _goto(page, world, f"/api/workflows/{foreign['workflow_id']}") == 404
        assert await _goto(page, world, "/dead-letters") == 403
    finally:
        await page.context.close()


async def test_new_workflows_appear_without_a_reload(browser: Browser, world: World) -> None:
    page = await _page(browser, world, world.limited)
    try:
        assert await _goto(page, world, "/workflows") == 200
        await page.evaluate("window.__sameDocument = true")
        before = await page.locator("#workflows tbody tr").count()
        request_id = await world.stack.client.submit_stamp(ACME, content=b"live update",
                                                           content_type="text/plain")
        foreign_id = await world.stack.client.submit_stamp(OTHER, content=b"not for acme")
        wid = workflow_id_of(request_id)
        await page.wait_for_selector(f'#workflows tr[data-workflow="{wid}"]', timeout=30_000)
        assert await page.evaluate("window.__sameDocument") is True  # no reload happened
        first = await page.eval_on_selector("#workflows tbody tr", "r => r.dataset.workflow")
        assert first == str(wid)

        async def foreign_recorded() -> bool:
            rows = await fetch(world.database_url, "SELECT 1 FROM workflows "
                               "WHERE workflow_id = $1", workflow_id_of(foreign_id))
            return bool(rows)

        await wait_for(foreign_recorded, 30, "the other namespace's workflow")
        await page.wait_for_timeout(2500)  # one more poll after it was recorded
        assert await page.locator(
            f'#workflows tr[data-workflow="{workflow_id_of(foreign_id)}"]').count() == 0
        assert await page.locator("#workflows tbody tr").count() == before + 1
    finally:
        await page.context.close()
        await world.refresh()


async def test_a_replay_asks_for_confirmation_and_happens_once(browser: Browser,
                                                               world: World) -> None:
    page = await _page(browser, world, world.ops)
    try:
        assert await _goto(page, world, "/dead-letters") == 200
        await _shot(page, "dead-letters")
        link = page.locator("#dead-letters a.button").first
        letter = await page.locator("#dead-letters tr:has(a.button)").first.get_attribute(
            "data-letter")
        assert letter is not None
        partition, offset = (int(x) for x in letter.split(":"))
        await link.click()
        await page.wait_for_load_state()
        confirm_url = page.url
        assert confirm_url.endswith(f"/dead-letters/requests/{partition}/{offset}")
        await _shot(page, "replay-confirm")

        dialogs: list[str] = []

        async def dismiss(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            await dialog.dismiss()

        page.once("dialog", dismiss)
        await page.click("#replay-button")
        await page.wait_for_timeout(500)
        assert dialogs and "Replay this dead letter" in dialogs[0]
        assert page.url == confirm_url  # dismissed: nothing was posted
        assert await _replays(world, partition, offset) == []

        async def accept(dialog: Dialog) -> None:
            await dialog.accept()

        page.once("dialog", accept)
        async with page.expect_navigation():
            await page.click("#replay-button")
        assert await page.text_content("#outcome") == "Replayed"
        assert [(r["by_role"], r["times"]) for r in await _replays(world, partition, offset)] \
            == [(world.ops.role, 1)]

        assert await _goto(page, world, confirm_url.removeprefix(world.server.url)) == 200
        assert await page.locator("#replay-form").count() == 0
        assert "Replayed before" in (await page.text_content("#already") or "")
        assert await _goto(page, world, "/dead-letters") == 200
        row = await _texts(page, f'#dead-letters tr[data-letter="{letter}"] td')
        assert row[6].startswith("to ") and world.ops.role in row[6]
    finally:
        await page.context.close()


async def _replays(world: World, partition: int, offset: int) -> list[dict[str, Any]]:
    return await fetch(world.database_url, 'SELECT by_role, times FROM dlq_replays '
                       'WHERE partition = $1 AND "offset" = $2', partition, offset)
