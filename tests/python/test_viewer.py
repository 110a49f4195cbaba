"""Issue 8: the trace viewer on the management listener (/viewer), driven in
headless Chromium with selenium. One traced request (a debug credential from
listDebugCredentials, and a header whose value is HTML) and one untraced
request go through the gateway; the page lists both behind an operator token
kept in sessionStorage, shows the traced one as a timeline at its own URL,
shows the HTML as text, and runs under a strict CSP without violations.

Without /usr/bin/chromium and /usr/bin/chromedriver (Debian's `chromium` and
`chromium-driver`) or selenium, the browser test is skipped, unless
SLUICE_REQUIRE_BROWSER is set: then it fails."""

import json
import os
import pathlib
import re

import httpx
import pytest

from conftest import start_gateway

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the `browser` fixture
    webdriver = None

CHROMIUM = os.environ.get("SLUICE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SLUICE_CHROMEDRIVER", "/usr/bin/chromedriver")
ASSETS = pathlib.Path(__file__).resolve().parents[2] / "crates" / "sluice-proxy" / "assets"

OPERATOR = "viewer-operator-token-0123456789"
KEY = "viewer-team-a-key-0123456789"
API_VERSION = "2024-10-21"
TRACED_PATH = "/openai/deployments/gpt-4o/chat/completions"
UNTRACED_PATH = "/openai/deployments/gpt-4o-mini/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PROBE = "<img src=x onerror=alert(1)><script>window.__pwned=1</script>"
CSP = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "connect-src": "'self'",
    "img-src": "'self'",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}

CONFIG = """
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
    operator_tokens: [{file: operator.token}]
simulators:
  - name: eastus
    region: East US
backends:
  - name: eastus
    simulator: eastus
subscriptions:
  - name: team-a
    primary_key: {file: a.key}
apis:
  - name: azure-openai
    path: /openai
    backends: [eastus]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    d = tmp_path_factory.mktemp("viewer")
    (d / "operator.token").write_text(OPERATOR)
    (d / "a.key").write_text(KEY)
    g = start_gateway(d, CONFIG)
    yield g
    g.stop()


def _browser_problem():
    if webdriver is None:
        return "selenium is not installed (pip install -r tests/python/requirements.txt)"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser():
    problem = _browser_problem()
    if problem:
        if os.environ.get("SLUICE_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"SLUICE_REQUIRE_BROWSER is set but {problem}")
        pytest.skip(f"no browser for the viewer test: {problem}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def csp_directives(header):
    out = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            out[words[0].lower()] = " ".join(words[1:])
    return out


def test_the_viewer_is_open_and_served_under_a_strict_csp(gw):
    assets = {
        "/viewer": ("viewer.html", "text/html"),
        "/viewer/traces/0123456789abcdef0123456789abcdef": ("viewer.html", "text/html"),
        "/viewer/app.js": ("viewer.js", "javascript"),
        "/viewer/app.css": ("viewer.css", "text/css"),
    }
    for path, (name, kind) in assets.items():
        r = httpx.get(f"{gw.management}{path}", timeout=10)  # no token: the page is open
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        assert csp_directives(r.headers.get("content-security-policy", "")) == CSP, (path, r.headers)
        assert kind in r.headers.get("content-type", ""), (path, r.headers.get("content-type"))
        assert r.text == (ASSETS / name).read_text(), f"{path} is not the embedded {name}"
    html = (ASSETS / "viewer.html").read_text()
    assert '<script src="/viewer/app.js"' in html and 'href="/viewer/app.css"' in html
    assert not re.search(r"<script(?![^>]*\ssrc=)", html), "an inline script"
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html, re.I), "an inline style or handler"
    # The script builds the DOM from text only and keeps the token out of
    # localStorage (its comments may name what it avoids).
    js = "\n".join(line for line in (ASSETS / "viewer.js").read_text().splitlines() if not line.strip().startswith("//"))
    for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "localStorage"]:
        assert sink not in js, f"viewer.js uses {sink}"
    # The data behind the page needs the operator token.
    for path in ["/traces", "/traces/0123456789abcdef0123456789abcdef"]:
        r = httpx.get(f"{gw.management}{path}", timeout=10)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "Unauthorized"


def send_requests(gw):
    """One traced request (with HTML in a header) and one untraced; returns
    the trace id."""
    r = httpx.post(
        f"{gw.management}/gateways/managed/listDebugCredentials",
        headers={"authorization": f"Bearer {OPERATOR}"},
        json={"credentialsExpireAfter": "PT1H", "apiId": "/apis/azure-openai", "purposes": ["tracing"]},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    debug = r.json()["token"]
    r = httpx.post(
        f"{gw.url}{TRACED_PATH}?api-version={API_VERSION}",
        headers={"api-key": KEY, "Apim-Debug-Authorization": debug, "x-probe": PROBE},
        json=BODY,
        timeout=30,
    )
    assert r.status_code == 200, r.text[:300]
    trace_id = r.headers.get("apim-trace-id")
    assert trace_id, f"no Apim-Trace-Id: {dict(r.headers)}"
    r = httpx.post(f"{gw.url}{UNTRACED_PATH}?api-version={API_VERSION}", headers={"api-key": KEY}, json=BODY, timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert "apim-trace-id" not in r.headers
    return trace_id


def management_get(gw, path):
    return httpx.get(f"{gw.management}{path}", headers={"authorization": f"Bearer {OPERATOR}"}, timeout=10)


def wait(driver, condition, message, timeout=15):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=message)


def displayed(driver, css):
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def js(driver, script):
    return driver.execute_script(script)


def assert_no_alert(driver):
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    pytest.fail(f"an alert opened: {text!r}")


def assert_trace_shown(driver, trace_id):
    """The timeline of the traced request: sections in order, entries with
    their source, elapsed and timestamp, the probe as text."""
    wait(driver, lambda d: d.current_url.endswith(f"/viewer/traces/{trace_id}"), "the trace URL")
    wait(driver, lambda d: displayed(d, "#trace .entry"), "trace entries")
    assert not displayed(driver, "#token-section") and not displayed(driver, "#list-section")
    assert trace_id in driver.find_element(By.ID, "trace-id").text
    sections = [s.get_attribute("data-section") for s in driver.find_elements(By.CSS_SELECTOR, "#trace [data-section]")]
    for name in ["inbound", "backend", "outbound"]:
        assert name in sections, sections
        assert driver.find_elements(By.CSS_SELECTOR, f'#trace [data-section="{name}"] .entry'), name
    order = ["inbound", "backend", "outbound", "on-error"]
    known = [s for s in sections if s in order]
    assert known == sorted(known, key=order.index), sections
    sources = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#trace .entry .source")]
    assert "api-inspector" in sources, sources
    for entry in driver.find_elements(By.CSS_SELECTOR, "#trace .entry"):
        assert entry.find_element(By.CSS_SELECTOR, ".elapsed").text.strip("+")
        assert entry.find_element(By.CSS_SELECTOR, ".timestamp").text
    text = js(driver, "return document.getElementById('trace').textContent")
    assert PROBE in text, "the x-probe header is not shown as text"
    assert js(driver, "return document.images.length") == 0, "an img element was created"
    assert js(driver, "return document.querySelectorAll('#trace script, #trace img').length") == 0
    assert js(driver, "return typeof window.__pwned") == "undefined"
    assert_no_alert(driver)


def test_the_viewer_lists_requests_and_shows_a_trace_safely(gw, browser):
    d = browser
    trace_id = send_requests(gw)
    # The summaries and the trace are recorded when the responses end.
    def recorded(_):
        r = management_get(gw, "/traces")
        assert r.status_code == 200, r.text
        summaries = r.json()["summaries"]
        ours = {s["path"]: s for s in summaries if s["path"] in (TRACED_PATH, UNTRACED_PATH)}
        return len(ours) == 2 and management_get(gw, f"/traces/{trace_id}").status_code == 200 and ours
    ours = wait(d, recorded, "both summaries and the trace recorded")
    assert ours[TRACED_PATH]["traceId"] == trace_id and ours[UNTRACED_PATH]["traceId"] is None

    # The page asks for a token first, and again after a 401.
    d.get(f"{gw.management}/viewer")
    wait(d, lambda d: displayed(d, "#token"), "the token prompt")
    assert not displayed(d, "#list-section") and not displayed(d, "#forget-token")
    d.find_element(By.ID, "token").send_keys("not-the-operator-token-000")
    d.find_element(By.ID, "save-token").click()
    wait(d, lambda d: displayed(d, "#error") and "401" in d.find_element(By.ID, "error").text, "the 401 message")
    assert displayed(d, "#token")
    assert js(d, "return sessionStorage.length") == 0, "a rejected token is kept"

    d.find_element(By.ID, "token").send_keys(OPERATOR)
    d.find_element(By.ID, "save-token").click()
    rows = wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#summaries tbody tr")) >= 2
                and d.find_elements(By.CSS_SELECTOR, "#summaries tbody tr"), "the request list")
    assert not displayed(d, "#error") and not displayed(d, "#token-section") and displayed(d, "#forget-token")
    # The token: in sessionStorage only, never in localStorage or the URL.
    assert OPERATOR in js(d, "return Object.values(sessionStorage)")
    assert js(d, "return localStorage.length") == 0
    assert OPERATOR not in d.current_url

    traced = d.find_element(By.CSS_SELECTOR, f'#summaries tbody tr[data-trace-id="{trace_id}"]')
    for text in ["POST", TRACED_PATH, "team-a", "gpt-4o", "200"]:
        assert text in traced.text, (text, traced.text)
    untraced = [r for r in rows if UNTRACED_PATH in r.text]
    assert len(untraced) == 1 and not untraced[0].find_elements(By.TAG_NAME, "a"), "the untraced row links nowhere"
    assert "team-a" in untraced[0].text and "gpt-4o-mini" in untraced[0].text
    link = traced.find_element(By.CSS_SELECTOR, "a")
    assert link.get_attribute("href").endswith(f"/viewer/traces/{trace_id}")

    link.click()
    assert_trace_shown(d, trace_id)

    # Back and forward move between the list and the trace.
    d.back()
    wait(d, lambda d: d.current_url.endswith("/viewer") and displayed(d, "#summaries tbody tr"), "the list again")
    d.forward()
    assert_trace_shown(d, trace_id)

    # A direct load of the trace URL: the token is still there for the session.
    d.refresh()
    assert_trace_shown(d, trace_id)
    assert not displayed(d, "#token-section")

    # A filter goes to the server and into the page URL.
    d.get(f"{gw.management}/viewer")
    wait(d, lambda d: displayed(d, "#summaries tbody tr"), "the list")
    d.find_element(By.ID, "f-status").send_keys("5xx")
    d.find_element(By.ID, "refresh").click()
    wait(d, lambda d: "status=5xx" in d.current_url
         and not d.find_elements(By.CSS_SELECTOR, f'#summaries tbody tr[data-trace-id="{trace_id}"]')
         and d.find_elements(By.CSS_SELECTOR, "#summaries tbody tr.empty"), "no 5xx requests")
    d.find_element(By.ID, "f-status").clear()
    d.find_element(By.ID, "f-deployment").send_keys("gpt-4o-mini")
    d.find_element(By.ID, "refresh").click()
    wait(d, lambda d: "deployment=gpt-4o-mini" in d.current_url and "status=" not in d.current_url
         and [r for r in d.find_elements(By.CSS_SELECTOR, "#summaries tbody tr") if UNTRACED_PATH in r.text]
         and not d.find_elements(By.CSS_SELECTOR, f'#summaries tbody tr[data-trace-id="{trace_id}"]'),
         "only the gpt-4o-mini request")

    # An unknown trace says so.
    d.get(f"{gw.management}/viewer/traces/{'0' * 32}")
    wait(d, lambda d: displayed(d, "#error") and "no trace" in d.find_element(By.ID, "error").text.lower(), "the 404 message")
    assert not d.find_elements(By.CSS_SELECTOR, "#trace .entry")

    # Forgetting the token clears it and asks again.
    d.get(f"{gw.management}/viewer/traces/{trace_id}")
    assert_trace_shown(d, trace_id)
    d.find_element(By.ID, "forget-token").click()
    wait(d, lambda d: displayed(d, "#token"), "the token prompt after forgetting")
    assert js(d, "return sessionStorage.length") == 0
    assert not d.find_elements(By.CSS_SELECTOR, "#trace .entry")
    # A fresh session on a trace URL: the token first, then that trace.
    d.execute_script("sessionStorage.clear()")
    d.refresh()
    wait(d, lambda d: displayed(d, "#token"), "the token prompt on a trace URL")
    d.find_element(By.ID, "token").send_keys(OPERATOR)
    d.find_element(By.ID, "save-token").click()
    assert_trace_shown(d, trace_id)

    # No CSP violation and no script error in the console.
    try:
        logs = d.get_log("browser")
    except (AttributeError, WebDriverException):
        logs = None  # a driver without the log endpoint
    if logs is not None:
        problems = [
            e["message"] for e in logs
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"] or "Uncaught" in e["message"]
        ]
        assert not problems, json.dumps(problems, indent=2)
