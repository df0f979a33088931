"""The chat page at `/`, in a real headless browser (Debian's Chromium driven by Playwright) against the real SmolLM2
server: streaming, Stop, safe rendering, the API-key flow, persistence, and the server states the page reports."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from .server_utils import ServerProcess, free_port, scrape, wait_idle

KEY = "sk-ui-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Greedy and short unless a test says otherwise.
SETTINGS = {"system": "Be brief.", "temperature": "0", "max_tokens": "64", "mode": "text"}


def _chromium() -> str | None:
    return os.environ.get("MLC_LLM_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


# ---- without a browser -------------------------------------------------------------------------------------------
def _app(ui: bool):
    from fastapi.testclient import TestClient

    from mlc_llm.serve.server import ServerSettings, create_app

    def load():
        raise RuntimeError("no model in this test")

    return TestClient(create_app(load, "m", ServerSettings(api_key=KEY, ui=ui)))


def test_page_is_served_without_key_with_a_strict_content_policy():
    with _app(ui=True) as c:
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
        for asset in ("ui/app.js", "ui/markdown.js", "ui/style.css"):
            assert asset in page.text
            assert c.get("/" + asset).status_code == 200
        assert c.get("/v1/models").status_code == 401  # the page can do nothing without the key


def test_no_ui_turns_the_page_off():
    with _app(ui=False) as c:
        assert c.get("/").status_code == 404
        assert c.get("/ui/app.js").status_code == 404


# ---- in the browser ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; or set MLC_LLM_CHROMIUM to a binary)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(smollm_q4, tmp_path_factory):
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode", "server",
                         "--overrides", "max_num_sequence=4;max_total_seq_length=4096",
                         "--served-model-name", "smollm", "--api-key", KEY], free_port(),
                        tmp_path_factory.mktemp("ui") / "server.log")
    srv.wait_health(200)
    yield srv
    srv.stop()


class Page:
    """One browser tab on the chat page, with the page's errors collected."""

    def __init__(self, browser, url: str, key: str | None = KEY, settings: dict | None = None):
        # bypass_csp: the tests evaluate scripts in the page, and the renderer is checked safe without the policy's help
        self.context = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)
        stored = {"settings": settings if settings is not None else SETTINGS}
        if key:
            stored["apiKey"] = key
        self.page.evaluate("s => { for (const [k, v] of Object.entries(s)) localStorage.setItem('mlc_llm.' + k,"
                           " JSON.stringify(v)); }", stored)
        self.page.reload()

    def connected(self, timeout: float = 30_000) -> None:
        self.page.wait_for_selector("#model-name:has-text('smollm')", timeout=timeout)

    def ask(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")  # the page marks itself busy before the key event returns

    def wait_answer(self, timeout: float = 120_000) -> str:
        self.page.wait_for_selector("#send:visible", timeout=timeout)
        return self.page.inner_text("#messages .msg.assistant:last-child .body")

    def close(self) -> None:
        assert not self.errors, self.errors
        self.context.close()


@pytest.fixture
def tab(browser, server):
    t = Page(browser, server.url)
    t.connected()
    yield t
    t.close()


def test_answer_streams_in_with_speed_and_model_info(tab):
    p = tab.page
    assert "context 4,096 tokens" in p.inner_text("#model-ctx")
    # record every text the answer shows while it streams
    p.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const b = document.querySelector('#messages .msg.assistant:last-child .body');
            if (b && b.textContent && window.__seen[window.__seen.length - 1] !== b.textContent)
                window.__seen.push(b.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    tab.ask("What is the capital of France?")
    assert "Paris" in tab.wait_answer()
    # an answer forced to 300+ tokens, to be seen growing whatever the speed (the page redraws at 10 Hz)
    p.evaluate("window.__seen = []")
    p.click("#toggle-settings")
    p.select_option("#output-mode", "json_schema")
    p.fill("#schema", json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 150}))
    p.fill("#max-tokens", "1000")
    tab.ask("Some numbers, please.")
    tab.wait_answer()
    seen = p.evaluate("window.__seen")
    assert len(seen) >= 3 and len(seen[0]) < len(seen[-1]), seen
    assert all(seen[-1].startswith(s) for s in seen), seen  # each redraw extends the last one
    meta = p.inner_text("#messages .msg.assistant:last-child .meta")
    assert "TTFT" in meta and "tok/s" in meta and "generated tokens" in meta, meta
    assert "tok/s" in p.inner_text("#stats")


def test_stop_aborts_the_request_and_frees_the_kv_cache(tab, server):
    idle = wait_idle(server)
    p = tab.page
    p.click("#toggle-settings")
    p.fill("#max-tokens", "3000")
    p.select_option("#output-mode", "json_schema")
    # a schema that forces a long answer, so Stop always lands mid-stream
    p.fill("#schema", json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 1000}))
    tab.ask("List numbers.")
    p.wait_for_function("document.querySelector('#messages .msg.assistant:last-child .body').textContent.length > 20",
                        timeout=60_000)
    assert scrape(server.url)["mlc_llm:num_requests_running"] == 1
    p.click("#stop")
    p.wait_for_selector("#send:visible", timeout=5_000)
    after = wait_idle(server, timeout=10)
    assert after["mlc_llm:kv_cache_usage_perc"] == 0.0
    key = 'mlc_llm:request_success_total{finished_reason="abort",model_name="smollm"}'
    assert after[key] == idle.get(key, 0) + 1
    assert "stopped" in p.inner_text("#messages .msg.assistant:last-child .meta")


def test_markup_in_an_answer_is_shown_as_text(tab):
    p = tab.page
    p.click("#toggle-settings")
    p.select_option("#output-mode", "json_schema")
    payload = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"><b>bold?</b>"
    p.fill("#schema", json.dumps({"type": "object", "properties": {"html": {"const": payload}}, "required": ["html"]}))
    p.fill("#max-tokens", "200")
    tab.ask("Write some HTML.")
    answer = tab.wait_answer()
    assert "<script>window.__pwned = 1</script>" in answer  # the model's answer, shown as characters
    assert p.evaluate("window.__pwned") is None
    assert p.evaluate("document.querySelectorAll('#messages script, #messages img, #messages b').length") == 0


def test_tools_box_gets_a_tool_call(tab):
    p = tab.page
    p.click("#toggle-settings")
    p.select_option("#output-mode", "tools")
    p.fill("#tools", json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]))
    p.select_option("#tool-choice", "required")
    p.fill("#max-tokens", "100")
    tab.ask("What is the weather in Paris?")
    tab.wait_answer()
    call = p.inner_text("#messages .msg.assistant:last-child .tool-call")
    assert "tool call: get_weather" in call
    assert "city" in json.loads(call.split("\n", 1)[1])


def test_markdown_renderer_builds_safe_elements(tab):
    p = tab.page
    html = p.evaluate("""() => {
        const d = document.createElement('div');
        MD.render('# Title\\n**bold** and `<i>code</i>`\\n\\n- [ok](https://example.com)\\n'
                  + '- [bad](javascript:alert(1))\\n\\nkeep snake_case_name and a.__x = 1, b.__y\\n\\n'
                  + '```html\\n<script>x</script>\\n```\\n<img src=x onerror=alert(1)>', d);
        return d.innerHTML;
    }""")
    assert "<strong>bold</strong>" in html and "<code>&lt;i&gt;code&lt;/i&gt;</code>" in html
    assert '<a href="https://example.com"' in html and "javascript:" not in html.split("<a ")[-1].split(">")[0]
    assert "[bad](javascript:alert(1))" in html  # an unsafe link stays text
    assert "keep snake_case_name and a.__x = 1, b.__y" in html  # underscores inside words are not emphasis
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script" not in html and "<img" not in html


def test_regenerate_edit_and_reload_keep_the_conversation(tab):
    p = tab.page
    tab.ask("What is the capital of France?")
    first = tab.wait_answer()
    p.click("#regenerate")
    assert tab.wait_answer() == first  # greedy: the same answer again, in place of the old one
    assert p.locator("#messages .msg").count() == 2
    p.reload()
    tab.connected()
    assert p.locator("#messages .msg").count() == 2
    assert first in p.inner_text("#messages")
    assert "capital of France" in p.inner_text("#chats")
    p.click("#edit")  # the last question goes back into the box, its answer away
    assert p.input_value("#prompt") == "What is the capital of France?"
    assert p.locator("#messages .msg").count() == 0
    p.fill("#prompt", "What is the capital of Italy?")
    p.press("#prompt", "Enter")
    second = tab.wait_answer()
    assert second and second != first
    p.click("#new-chat")
    assert p.locator("#messages .msg").count() == 0
    assert p.locator("#chats li").count() == 2
    p.click("#chats li:not(.active)")
    assert "capital of Italy" in p.inner_text("#messages .msg.user") and second in p.inner_text("#messages")


def test_api_key_is_asked_for_and_checked(browser, server):
    t = Page(browser, server.url, key=None)
    p = t.page
    p.wait_for_selector("#key-dialog[open]", timeout=30_000)
    p.fill("#key-input", "sk-wrong")
    p.click("#key-save")
    p.wait_for_selector("#key-error:has-text('This key was refused by the server.')")
    assert p.inner_text("#model-name") != "smollm"
    p.fill("#key-input", KEY)
    p.click("#key-save")
    t.connected()
    assert not p.is_visible("#key-dialog")
    assert p.evaluate("JSON.parse(localStorage.getItem('mlc_llm.apiKey'))") == KEY
    t.close()


def test_server_errors_and_states_are_reported(tab, server):
    p = tab.page
    # an answer the server refuses: its message is shown in the conversation
    p.click("#toggle-settings")
    p.fill("#max-tokens", "100000")
    tab.ask("Hello")
    tab.wait_answer()
    error = p.inner_text("#messages .msg.assistant:last-child .error")
    assert error.startswith("400:") and "context" in error, error
    # bad JSON in the schema box: said before anything is sent
    p.select_option("#output-mode", "json_schema")
    p.fill("#schema", "{not json")
    assert "not valid JSON" in p.inner_text("#settings-error")
    # loading, then unreachable, as the page sees them
    p.route("**/health", lambda route: route.fulfill(status=503, content_type="application/json",
                                                    body=json.dumps({"status": "loading"})))
    p.reload()
    p.wait_for_selector("#banner:has-text('loading')", timeout=10_000)
    p.unroute("**/health")
    p.route("**/health", lambda route: route.abort())
    p.wait_for_selector("#banner:has-text('unreachable')", timeout=10_000)
    p.unroute("**/health")
    p.wait_for_selector("#banner", state="hidden", timeout=10_000)
    tab.connected()


def _fake_stream(page, body: str) -> None:
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                                     body=body))


@pytest.mark.parametrize("body", [
    'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\r\n\r\n'
    'data: {"choices":[{"index":0,"delta":{"content":" world"}}]}\r\n\r\ndata: [DONE]\r\n\r\n',
    'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{"content":" world"}}]}',  # the last event without its blank line
    'data: {"choices":[{"index":0,\ndata: "delta":{"content":"Hello world"}}]}\n\n',  # one event, two data lines
], ids=["crlf", "unterminated", "multiline"])
def test_event_stream_variants_are_read_whole(tab, body):
    _fake_stream(tab.page, body)
    tab.ask("hi")
    assert tab.wait_answer() == "Hello world"
    assert tab.page.locator("#messages .msg.assistant:last-child .error").count() == 0


def test_a_refused_send_keeps_the_typed_text_and_the_answer(tab):
    p = tab.page
    _fake_stream(p, 'data: {"choices":[{"index":0,"delta":{"content":"A1"}}]}\n\ndata: [DONE]\n\n')
    tab.ask("q1")
    assert tab.wait_answer() == "A1"
    p.click("#toggle-settings")
    p.select_option("#output-mode", "json_schema")
    p.fill("#schema", "{bad")
    p.fill("#prompt", "my long question")
    p.press("#prompt", "Enter")
    assert p.input_value("#prompt") == "my long question"  # not sent, not lost
    p.click("#regenerate")  # refused too: the old answer stays, on screen and in storage
    p.reload()
    tab.connected()
    assert p.locator("#messages .msg").count() == 2 and "A1" in p.inner_text("#messages")


def test_degenerate_answers_render_and_a_stored_one_does_not_break_the_page(tab):
    p = tab.page
    shapes = ["# a" + " " * 20000 + "b", ">" * 20000 + " deep", "[" * 50000, "`a` " * 10000, "** a " * 10000,
              "```" + " " * 20000 + "x", "  " * 5000 + "- nested"]
    for text in shapes:  # each renders, as text, in one piece (exponential or deep recursion would not return)
        shown = p.evaluate("t => { const d = document.createElement('div'); MD.render(t, d); return d.textContent; }",
                           text)
        assert shown.replace(" ", "")[:1000] and len(shown) <= len(text) + 10
    p.evaluate("t => localStorage.setItem('mlc_llm.chats', JSON.stringify({x: {id: 'x', title: 'deep', updated: 1,"
               " messages: [{role: 'user', content: 'q'}, {role: 'assistant', content: t}]}, bad: null}))",
               ">" * 20000 + " deep")
    p.evaluate("localStorage.setItem('mlc_llm.current', JSON.stringify('x'))")
    p.reload()
    tab.connected()
    assert "deep" in p.inner_text("#messages")


def test_theme_is_kept(tab):
    p = tab.page
    before = p.evaluate("document.documentElement.dataset.theme")
    p.click("#theme")
    after = p.evaluate("document.documentElement.dataset.theme")
    assert {before, after} == {"light", "dark"}
    p.reload()
    assert p.evaluate("document.documentElement.dataset.theme") == after
