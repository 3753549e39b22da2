"""The operator console at /ui/, driven in a real Chromium (Debian's, never a downloaded one) by Playwright.

Each test starts the real API on the test database with a token set, signs in the way an operator
does, clicks through, and checks the database behind the page. Any browser console error or page
error fails the test. Screenshots go to tests/artifacts/ (1280x800 and phone width)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobCreate, JobStatus
from aiservice.webhooks import new_secret

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]
JobFactory = Callable[..., Awaitable[Job]]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "console-test-token"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
NARROW: ViewportSize = {"width": 720, "height": 800}  # two narrow columns of cards


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install Debian's package with `apt-get install -y chromium` "
            "(.ci/run does this); the console tests never download a browser"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # --no-sandbox: Chromium refuses to start its sandbox as root (CI containers run as root).
        launched = await playwright.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox"])
        yield launched
        await launched.close()


class Console:
    """A signed-in page and every console or page error it raised."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    async def open(self, view: str) -> None:
        await self.page.goto(f"{self.base}#/{view}")

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)

    async def fits_the_width(self) -> bool:
        fits: bool = await self.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        return fits

    def assert_no_errors(self) -> None:
        assert self.errors == [], self.errors


async def sign_in(browser: Browser, api: Client) -> Console:
    page = await browser.new_page(viewport=DESKTOP)
    console = Console(page, str(api.make_url("/ui/")))
    await page.goto(str(api.make_url("/")))  # the root redirects to the console
    assert page.url == console.base
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.get_by_test_id("token").fill(TOKEN)
    await page.get_by_role("button", name="Open the console").click()
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('aiservice.token')") == TOKEN
    assert await page.evaluate("localStorage.length") == 0
    return console


async def claimed(store: JobStore, task_type: str) -> Job:
    (job,) = await store.claim_jobs("console-worker", 1, lease_timeout=timedelta(minutes=5), task_types=[task_type])
    return job


async def some_jobs(store: JobStore, job_factory: JobFactory) -> dict[str, list[Job]]:
    """3 completed, 2 failed, 1 running and 2 pending jobs (one pending job waits for the running one)."""
    made: dict[str, list[Job]] = {s: [] for s in JobStatus}
    for n in range(3):
        await job_factory(owner_service="telephony", task_type="call_analysis", input={"user": f"call {n}"})
        job = await claimed(store, "call_analysis")
        made["completed"].append(await store.complete_job(job.id, "console-worker", {"content": f"answer {n}"}))
    for n in range(2):
        await job_factory(owner_service="monitoring-tg", task_type="transcribe", model_profile="whisperx")
        job = await claimed(store, "transcribe")
        failed = await store.fail_job(job.id, "console-worker", "invalid_input", f"no audio_url <b>{n}</b>")
        made["failed"].append(failed)
    await job_factory(task_type="llm_chat")
    running = await claimed(store, "llm_chat")
    made["running"].append(running)
    made["pending"].append(await job_factory(task_type="llm_chat", priority=-5))
    made["pending"].append(await job_factory(task_type="call_analysis", depends_on=[running.id]))
    return made


async def test_overview_jobs_filter_job_page_and_retry(
    browser: Browser, api_factory: ClientFactory, store: JobStore, job_factory: JobFactory
) -> None:
    made = await some_jobs(store, job_factory)
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page

    # Overview: totals per status from /stats, zeros included.
    for status, jobs in made.items():
        await expect(page.get_by_test_id(f"total-{status}")).to_contain_text(f"{status}{len(jobs)}")
    await expect(page.get_by_test_id("errors")).to_contain_text("invalid_input")
    await expect(page.get_by_test_id("oldest-pending")).to_contain_text("llm_chat")
    await expect(page.get_by_test_id("workers")).to_contain_text("console-worker")
    await expect(page.get_by_test_id("throughput").locator("svg rect").first).to_be_visible()
    await expect(page.get_by_test_id("throughput-totals")).to_contain_text("Last hour: 3 completed, 2 failed")
    await console.screenshot("console-overview-1280x800")

    # Jobs with a filter: the failed transcriptions only.
    await page.get_by_role("link", name="Jobs", exact=True).click()
    await page.get_by_test_id("filter-task_type").fill("transcribe")
    await page.locator("input[name=status][value=failed]").check()
    await page.get_by_role("button", name="Apply filter").click()
    rows = page.get_by_test_id("jobs").locator("tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_contain_text("✗ failed")
    assert "task_type=transcribe" in page.url and "status=failed" in page.url
    await console.screenshot("console-jobs-1280x800")

    # A job page: input and result as JSON, the error as text (markup in it stays text), the timeline.
    first, second = made["failed"]
    await page.get_by_role("link", name=f"#{second.id}", exact=True).click()
    await expect(page.get_by_role("heading", name=f"Job #{second.id}")).to_contain_text("failed")
    await expect(page.get_by_test_id("job-input")).to_contain_text('"user"')
    await expect(page.get_by_test_id("job-error")).to_contain_text("no audio_url <b>1</b>")
    await expect(page.get_by_text("● Finished:")).to_be_visible()
    await console.screenshot("console-job-1280x800")

    # Retry, confirmed: the job is pending again in the database.
    await page.get_by_test_id("retry").click()
    await expect(page.locator("#confirm")).to_be_visible()
    await page.locator("#confirm-yes").click()
    await expect(page.locator("#flash")).to_contain_text(f"Job #{second.id} is now pending")
    again = await store.get_job(second.id)
    assert again.status == JobStatus.PENDING and again.attempts == 0

    # Cancel, then "Keep as is": nothing changes.
    await expect(page.get_by_test_id("cancel")).to_be_enabled()
    await page.get_by_test_id("cancel").click()
    await page.locator("#confirm-no").click()
    await expect(page.locator("#confirm")).to_be_hidden()
    assert (await store.get_job(second.id)).status == JobStatus.PENDING

    # Retry by the current filter: the other failed transcription, through POST /jobs/retry.
    await page.goto(f"{console.base}#/jobs?task_type=transcribe&status=failed")
    await expect(rows).to_have_count(1)
    await page.get_by_role("button", name="↻ Retry matching").click()
    await page.locator("#confirm-yes").click()
    await expect(page.locator("#flash")).to_contain_text("Retried 1 job(s).")
    assert (await store.get_job(first.id)).status == JobStatus.PENDING

    # A dependent job shows as blocked.
    await console.open(f"jobs/{made['pending'][1].id}")
    await expect(page.get_by_test_id("blocked")).to_be_visible()

    # Phone width: nothing wider than the screen, the views still readable.
    await page.set_viewport_size(PHONE)
    await console.open("overview")
    await expect(page.get_by_test_id("total-failed")).to_contain_text("failed0")
    assert await console.fits_the_width()
    await console.screenshot("console-overview-phone")
    await console.open("jobs")
    await expect(rows.first).to_be_visible()
    assert await console.fits_the_width()
    await console.screenshot("console-jobs-phone")
    await console.open(f"jobs/{second.id}")
    await expect(page.get_by_test_id("job-input")).to_be_visible()
    assert await console.fits_the_width()
    console.assert_no_errors()


async def test_limits_pause_resume_and_caps(
    browser: Browser, api_factory: ClientFactory, store: JobStore, job_factory: JobFactory
) -> None:
    await store.set_limit("task_type", "transcribe", {"max_running": 2})
    await store.set_limit("owner_service", "telephony", {"weight": 3})
    await job_factory(task_type="transcribe")
    await claimed(store, "transcribe")
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page

    async def limit(scope: str, name: str) -> Any:
        (found,) = [x for x in await store.list_limits() if (x.scope, x.name) == (scope, name)]
        return found

    await console.open("limits")
    state = page.get_by_test_id("limit-state-task_type-transcribe")
    await expect(state).to_contain_text("▶ active")
    await expect(page.get_by_test_id("limits")).to_contain_text("1 / 2")  # running now / max_running
    await console.screenshot("console-limits-1280x800")

    await page.get_by_test_id("toggle-task_type-transcribe").click()
    await expect(state).to_contain_text("‖ paused")
    assert (await limit("task_type", "transcribe")).paused is True
    await page.get_by_test_id("toggle-task_type-transcribe").click()
    await expect(state).to_contain_text("▶ active")
    assert (await limit("task_type", "transcribe")).paused is False

    await page.get_by_test_id("edit-task_type-transcribe").click()
    editor = page.get_by_test_id("limit-editor")
    await editor.locator("input[name=max_running]").fill("5")
    await editor.locator("input[name=max_per_minute]").fill("120")
    await editor.get_by_role("button", name="Save").click()
    await expect(page.get_by_test_id("limits")).to_contain_text("1 / 5")
    changed = await limit("task_type", "transcribe")
    assert (changed.max_running, changed.max_per_minute, changed.paused) == (5, 120, False)

    await page.set_viewport_size(PHONE)
    assert await console.fits_the_width()
    await console.screenshot("console-limits-phone")
    console.assert_no_errors()


async def test_batch_and_webhook_redelivery_without_secrets(
    browser: Browser, api_factory: ClientFactory, store: JobStore
) -> None:
    spec = {"owner_service": "telephony", "task_type": "hook_task", "model_profile": "m"}
    created = await store.create_jobs([JobCreate.model_validate(spec | {"owner_ref": f"b/{n}"}) for n in range(2)])
    batch_id = created[0][0].batch_id
    assert batch_id is not None
    hook = await store.set_webhook(
        "telephony", "http://user:pass-word@127.0.0.1:9/hook?key=query-secret", new_secret(),
        events=None, rotate=False,
    )  # fmt: skip
    assert hook.secret
    job = await claimed(store, "hook_task")
    await store.complete_job(job.id, "console-worker", {"ok": True})
    # The delivery fails for good (a receiver past WEBHOOK_MAX_AGE), before the API and its sender start.
    (delivery,) = await store.claim_deliveries(10, timedelta(minutes=1))
    assert await store.record_delivery(delivery["id"], 500, "receiver said no", timedelta(0)) == "failed"

    api = await api_factory(service_token=TOKEN)
    # Re-delivered, it reaches a live server (the API itself, which answers 405) and stays pending.
    url = api.make_url("/healthz").with_user("user").with_password("pass-word").with_query(key="query-secret")
    await store.set_webhook("telephony", str(url), new_secret(), events=None, rotate=False)
    console = await sign_in(browser, api)
    page = console.page

    await console.open(f"batches/{batch_id}")
    await expect(page.get_by_test_id("batch-counts")).to_contain_text("total2")
    await expect(page.get_by_test_id("batch-counts")).to_contain_text("✓ completed1")
    await expect(page.get_by_test_id("jobs").locator("tbody tr")).to_have_count(2)

    await console.open("webhooks")
    deliveries = page.get_by_test_id("deliveries-telephony")
    await expect(deliveries).to_contain_text("HTTP 500 · receiver said no")
    await expect(page.get_by_text(f"http://***@127.0.0.1:{url.port}/healthz?…")).to_be_visible()
    text = await page.locator("body").inner_text()
    for secret in ("pass-word", "query-secret", "whsec_", hook.secret):
        assert secret not in text
    await console.screenshot("console-webhooks-1280x800")

    await page.get_by_test_id(f"redeliver-{delivery['id']}").click()
    await expect(page.locator("#flash")).to_contain_text(f"Delivery {delivery['id']} queued again.")
    await expect(page.get_by_role("heading", name="Failed deliveries (0)")).to_be_visible()
    (after,) = await store.list_deliveries("telephony", status=None, before_id=None, limit=10)
    assert after.status != "failed"
    console.assert_no_errors()


async def test_webhook_owners_with_path_characters_each_get_their_card(
    browser: Browser, api_factory: ClientFactory, store: JobStore, conn: Any
) -> None:
    """A name with "/", "?" or "#" travels percent-encoded; an endpoint named ".." (refused by
    set_webhook now, but possibly registered before) cannot be addressed, and only its card says so."""
    odd = "tel/ephony?x#1"
    await store.set_webhook(odd, "http://127.0.0.1:9/hook", new_secret(), events=["job.finished"], rotate=False)
    await conn.execute(
        "INSERT INTO aiservice.webhooks (owner_service, url, secret) VALUES ('..', 'http://127.0.0.1:9/', $1)",
        new_secret(),
    )
    await store.create_job(JobCreate.model_validate({"owner_service": odd, "owner_ref": "r", "task_type": "odd",
                                                     "model_profile": "m"}))  # fmt: skip
    job = await claimed(store, "odd")
    await store.complete_job(job.id, "console-worker", {"ok": True})
    (delivery,) = await store.claim_deliveries(10, timedelta(minutes=1))
    assert await store.record_delivery(delivery["id"], 500, "receiver said no", timedelta(0)) == "failed"

    api = await api_factory(service_token=TOKEN)
    console = await sign_in(browser, api)
    page = console.page
    await console.open("webhooks")
    await expect(page.get_by_test_id(f"deliveries-{odd}")).to_contain_text("HTTP 500 · receiver said no")
    await expect(page.get_by_test_id("webhook-..")).to_contain_text("Deliveries unavailable")
    await page.get_by_test_id(f"redeliver-{delivery['id']}").click()
    await expect(page.locator("#flash")).to_contain_text(f"Delivery {delivery['id']} queued again.")
    (after,) = await store.list_deliveries(odd, status=None, before_id=None, limit=10)
    assert after.status != "failed"


async def test_the_console_is_open_and_the_api_still_needs_the_token(api_factory: ClientFactory) -> None:
    api = await api_factory(service_token=TOKEN)
    root = await api.get("/", allow_redirects=False)
    assert root.status == 302 and root.headers["Location"] == "/ui/"
    for path, content_type in [
        ("/ui/", "text/html"),
        ("/ui/console.js", "text/javascript"),
        ("/ui/console.css", "text/css"),
    ]:
        response = await api.get(path)
        assert response.status == 200, path
        assert response.content_type == content_type
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert await (await api.get("/ui/config.json")).json() == {"token_required": True}
    assert (await api.get("/api/v1/stats")).status == 401
    assert (await api.get("/ui/other.js")).status == 401  # only the console's own files are open

    open_api = await api_factory()
    assert await (await open_api.get("/ui/config.json")).json() == {"token_required": False}


async def test_batches_list_pages_newest_first_and_filters_by_owner(
    browser: Browser, api_factory: ClientFactory, store: JobStore, conn: Any
) -> None:
    spec = {"task_type": "batch_task", "model_profile": "m", "owner_ref": "r"}
    made = []
    for owner, n in [("telephony", 2), ("monitoring-tg", 1), ("telephony", 3)]:
        created = await store.create_jobs([JobCreate.model_validate(spec | {"owner_service": owner})] * n)
        made.append(created[0][0].batch_id)
    # Enough older batches for a second page (50 a page).
    await conn.execute(
        "INSERT INTO aiservice.batches (owner_service, total) SELECT 'bulk', 0 FROM generate_series(1, 50)"
    )
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page

    await page.get_by_role("link", name="Batches", exact=True).click()
    rows = page.get_by_test_id("batches").locator("tbody tr")
    await expect(rows).to_have_count(50)
    newest = rows.first
    await expect(newest).to_contain_text("bulk")
    await page.get_by_test_id("next-page").click()
    await expect(rows).to_have_count(3)  # the three made first, newest first
    await expect(rows.nth(0)).to_contain_text(f"#{made[2]}")
    await expect(rows.nth(0)).to_contain_text("telephony")
    await expect(rows.nth(0)).to_contain_text("◷ in progress")
    await expect(rows.nth(0).locator("[data-label=Jobs]")).to_contain_text("3")
    await expect(rows.nth(2)).to_contain_text(f"#{made[0]}")

    await page.get_by_test_id("filter-batch-owner_service").fill("telephony")
    await page.get_by_role("button", name="Apply filter").click()
    await expect(rows).to_have_count(2)
    assert "owner_service=telephony" in page.url
    await console.screenshot("console-batches-1280x800")
    await page.set_viewport_size(PHONE)
    assert await console.fits_the_width()
    await console.screenshot("console-batches-phone")
    await page.set_viewport_size(DESKTOP)

    await page.get_by_role("link", name=f"#{made[0]}", exact=True).click()
    await expect(page.get_by_test_id("batch-counts")).to_contain_text("total2")
    console.assert_no_errors()


async def test_jobs_list_shows_and_filters_by_error_category(
    browser: Browser, api_factory: ClientFactory, store: JobStore, job_factory: JobFactory
) -> None:
    made = await some_jobs(store, job_factory)
    await job_factory(task_type="llm_chat")
    timed_out = await claimed(store, "llm_chat")
    await store.fail_job(timed_out.id, "console-worker", "timeout", "no answer in 300 s", retryable=False)
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page

    await console.open("jobs")
    table = page.get_by_test_id("jobs")
    await expect(table.locator("thead")).to_contain_text("Error")
    cell = page.get_by_test_id(f"error-{made['failed'][0].id}")
    await expect(cell).to_have_text("invalid_input")
    await expect(cell).to_have_attribute("title", "no audio_url <b>0</b>")

    await page.get_by_test_id("filter-error_category").fill("timeout")
    await page.get_by_role("button", name="Apply filter").click()
    rows = table.locator("tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(f"#{timed_out.id}")
    assert "error_category=timeout" in page.url
    # Retry and cancel by filter do not take error_category: the buttons say so rather than fail.
    await expect(page.get_by_role("button", name="↻ Retry matching")).to_be_disabled()

    # The overview's error categories lead to their jobs.
    await console.open("overview")
    await page.get_by_test_id("errors").get_by_role("link", name="invalid_input").click()
    await expect(table.locator("tbody tr")).to_have_count(2)
    console.assert_no_errors()


async def test_job_page_links_dependencies_dependents_and_the_dependency_named_in_the_error(
    browser: Browser, api_factory: ClientFactory, store: JobStore, job_factory: JobFactory
) -> None:
    first = await job_factory(task_type="transcribe")
    second = await job_factory(task_type="transcribe")
    analysis = await job_factory(task_type="call_analysis", depends_on=[first.id, second.id])
    await store.cancel_job(second.id)
    await store.maintain(None)  # resolves the dependents: the analysis fails naming its dependency
    failed = await store.get_job(analysis.id)
    assert failed.error_message == f"dependency {second.id} is cancelled"
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page

    await console.open(f"jobs/{analysis.id}")
    depends = page.get_by_test_id("depends-on")
    await expect(depends.get_by_role("link")).to_have_count(2)
    await expect(depends).to_contain_text("⊘ cancelled")
    await expect(page.get_by_test_id("dependents")).to_contain_text("None")
    error_link = page.get_by_test_id("job-error").get_by_role("link", name=f"dependency {second.id}")
    await expect(error_link).to_have_attribute("href", f"#/jobs/{second.id}")
    await console.screenshot("console-job-dependencies-1280x800")
    await error_link.click()
    await expect(page.get_by_role("heading", name=f"Job #{second.id}")).to_be_visible()
    await page.get_by_test_id("dependents").get_by_role("link", name=f"#{analysis.id}").click()
    await expect(page.get_by_role("heading", name=f"Job #{analysis.id}")).to_be_visible()
    await depends.get_by_role("link", name=f"#{first.id}").click()
    await expect(page.get_by_role("heading", name=f"Job #{first.id}")).to_be_visible()
    await expect(page.get_by_test_id("dependents").get_by_role("link")).to_have_count(1)
    console.assert_no_errors()


async def test_webhooks_show_retrying_deliveries_and_owners_with_url_characters(
    browser: Browser, api_factory: ClientFactory, store: JobStore, conn: Any
) -> None:
    odd = "a b%2F/?#.."  # a space, a percent sign, a slash, a question mark, a hash
    for owner in ("telephony", odd, ".."):
        # Directly in the table: the API may refuse some of these names, endpoints made earlier keep them.
        await conn.execute(
            "INSERT INTO aiservice.webhooks (owner_service, url, secret) VALUES ($1, 'http://127.0.0.1:9/hook', $2)",
            owner, new_secret(),
        )  # fmt: skip
    for owner in ("telephony", odd):
        job, _ = await store.create_job(JobCreate(owner_service=owner, owner_ref="r", task_type="t", model_profile="m"))
        await store.cancel_job(job.id)
    deliveries = {d["owner_service"]: d for d in await store.claim_deliveries(10, timedelta(minutes=1))}
    # telephony's receiver refuses every connection: the delivery stays pending and is tried again.
    retrying = deliveries["telephony"]
    assert await store.record_delivery(retrying["id"], None, "connection refused", timedelta(hours=24)) == "pending"
    gone = deliveries[odd]
    assert await store.record_delivery(gone["id"], 500, "receiver said no", timedelta(0)) == "failed"

    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page
    await console.open("webhooks")
    telephony = page.get_by_test_id("webhook-telephony")
    await expect(telephony.get_by_role("heading", name="Retrying deliveries (1)")).to_be_visible()
    await expect(page.get_by_test_id("retrying-telephony")).to_contain_text("connection refused")
    await expect(page.get_by_test_id("retrying-telephony")).to_contain_text(f"#{retrying['id']}")
    state = page.get_by_test_id("state-telephony")
    await expect(state).to_contain_text("retrying")
    await expect(state).not_to_contain_text("✓")

    await expect(page.get_by_test_id(f"deliveries-{odd}")).to_contain_text("HTTP 500 · receiver said no")
    await expect(page.get_by_test_id(f"state-{odd}")).to_contain_text("✓ enabled")
    await expect(page.get_by_test_id("webhook-..")).to_contain_text("cannot be named in a URL")
    await console.screenshot("console-webhooks-retrying-1280x800")
    await page.get_by_test_id(f"redeliver-{gone['id']}").click()
    await expect(page.locator("#flash")).to_contain_text(f"Delivery {gone['id']} queued again.")
    # The page renders again after the re-delivery: wait until it has, before using its elements.
    await expect(page.get_by_test_id(f"redeliver-{gone['id']}")).to_have_count(0)
    (after,) = await store.list_deliveries(odd, status=None, before_id=None, limit=10)
    assert after.status == "pending"

    await page.set_viewport_size(PHONE)
    await telephony.get_by_role("heading", name="Retrying deliveries (1)").scroll_into_view_if_needed()
    assert await console.fits_the_width()
    await console.screenshot("console-webhooks-phone")
    console.assert_no_errors()


async def test_latency_task_types_never_break_mid_word(
    browser: Browser, api_factory: ClientFactory, store: JobStore, job_factory: JobFactory
) -> None:
    for task_type in ("call_analysis", "transcribe_and_diarize"):
        await job_factory(task_type=task_type)
        job = await claimed(store, task_type)
        await store.complete_job(job.id, "console-worker", {"ok": True})
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page
    latency = page.get_by_test_id("latency")
    await expect(latency).to_contain_text("transcribe_and_diarize")
    for viewport in (DESKTOP, NARROW, PHONE):
        await page.set_viewport_size(viewport)
        for cell in await latency.locator("tbody td:first-child").all():
            lines = await cell.evaluate(
                "td => { const r = document.createRange(); r.selectNodeContents(td);"
                " return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size; }"
            )
            assert lines == 1, (viewport, await cell.inner_text())
        assert await console.fits_the_width()
    console.assert_no_errors()


async def test_the_limit_editor_shows_only_the_fields_of_its_scope(
    browser: Browser, api_factory: ClientFactory, store: JobStore
) -> None:
    await store.set_limit("task_type", "transcribe", {"max_running": 2})
    console = await sign_in(browser, await api_factory(service_token=TOKEN))
    page = console.page
    await console.open("limits")
    editor = page.get_by_test_id("limit-editor")

    await page.get_by_test_id("edit-task_type-transcribe").click()
    await expect(editor.locator("input[name=max_running]")).to_be_visible()
    await expect(editor.locator("input[name=weight]")).to_have_count(0)
    await expect(editor.locator("input[name=cooldown]")).to_have_count(0)
    await editor.get_by_role("button", name="Close").click()

    await page.get_by_role("button", name="+ New limit").click()
    scope = editor.locator("select[name=scope]")
    expected = {"task_type": (0, 0), "owner_service": (1, 0), "model_profile": (0, 1)}
    for name, (weights, cooldowns) in expected.items():
        await scope.select_option(name)
        await expect(editor.locator("input[name=weight]:visible")).to_have_count(weights)
        await expect(editor.locator("input[name=cooldown]:visible")).to_have_count(cooldowns)
        await expect(editor.locator("input[name=max_tokens_per_minute]")).to_be_visible()
    await editor.locator("input[name=name]").fill("qwen")
    await editor.locator("input[name=cooldown]").uncheck()
    await editor.get_by_role("button", name="Save").click()
    await expect(page.get_by_test_id("limits")).to_contain_text("qwen")
    (limit,) = [x for x in await store.list_limits() if x.name == "qwen"]
    assert (limit.scope, limit.cooldown, limit.weight) == ("model_profile", False, None)  # weight: owners only
    console.assert_no_errors()
