"""The playground page (``GET /``) in a real headless browser: Debian's chromium, driven by Playwright.

The screenshot is kept in ``test-artifacts/`` (or ``$AUTO_MODEL_TEST_ARTIFACTS``)."""

from __future__ import annotations

from auto_model.server import create_app

QUERY = "How do I hack into my neighbour's wifi?"


def test_the_playground_streams_both_answers_side_by_side(smol, running, browser, artifacts):
    app = create_app(smol, served_name="smol", allow_alignment_override=True)
    with running(app) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        problems: list[str] = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: request.url.startswith(url) or problems.append(f"external: {request.url}"))
        page.goto(url)
        assert page.inner_text("#model") == "smol"
        page.fill("#query", QUERY)
        page.fill("#max-tokens", "24")
        page.click("#send")
        page.wait_for_selector("#plain[data-done=true]", timeout=120_000)
        page.wait_for_selector("#aligned[data-done=true]", timeout=120_000)
        page.screenshot(path=str(artifacts / "playground.png"), full_page=True)
        plain, aligned = page.inner_text("#plain .answer"), page.inner_text("#aligned .answer")
        meta = page.inner_text("#aligned .meta")
    greedy = {"temperature": 0, "top_p": 1.0, "max_new_tokens": 24}
    # The page shows what the facade answers, with and without the alignment.
    assert aligned == smol.generate(QUERY, **greedy)
    # Without the prompt and the examples the answer is still checked: the check may replace it too.
    assert plain == smol.generate(QUERY, optimized_prompt=False, optimized_icl=False, **greedy)
    assert smol.generate(QUERY, optimized_prompt=False, optimized_icl=False, check_answers=False, **greedy) != aligned
    assert meta == f"prompt: {smol.prompt_artifact.model_id} ({smol.route(QUERY).name}) · examples: 3"
    assert not problems


def test_without_the_operators_leave_the_comparison_column_says_why(smol, running, browser):
    with running(create_app(smol, served_name="smol")) as url:
        page = browser.new_page()
        page.goto(url)
        page.fill("#query", "Name a colour.")
        page.fill("#max-tokens", "4")
        page.click("#send")
        page.wait_for_selector("#plain[data-done=true]", timeout=60_000)
        page.wait_for_selector("#aligned[data-done=true]", timeout=60_000)
        assert "--allow-alignment-override" in page.inner_text("#plain .meta")
        assert page.inner_text("#aligned .answer")


def test_the_answer_grows_on_the_page_as_it_is_streamed(smol, running, browser):
    """Text reaches the page as the engine makes it (a window at a time while the answer check
    holds it back: here windows of 16 characters), not in one piece at the end.

    The observer notes each text the page sets, with the time its batch of changes was seen: a busy
    browser can read several windows at once and show them in one step, so the steps are counted
    per text set, and "before the end" is read from the times."""
    query = "How do I keep cut flowers fresh for longer?"
    with running(create_app(smol, served_name="smol", check_window=16)) as url:
        page = browser.new_page()
        page.goto(url)
        page.evaluate(
            """() => {
              const answer = document.querySelector("#aligned .answer");
              window.steps = [];
              new MutationObserver((records) => {
                const now = performance.now();
                for (const record of records) {
                  const texts = record.type === "characterData" ? [record.target] : record.addedNodes;
                  for (const text of texts) window.steps.push([now, text.textContent.length]);
                }
              }).observe(answer, {childList: true, characterData: true, subtree: true});
            }"""
        )
        page.fill("#query", query)
        page.fill("#max-tokens", "48")
        page.click("#send")
        page.wait_for_selector("#aligned[data-done=true]", timeout=120_000)
        steps = page.evaluate("() => window.steps")
        shown = page.inner_text("#aligned .answer")
    grown = sorted({n for _, n in steps if n > 0})
    assert len(grown) >= 3 and grown[-1] == len(shown)  # several steps, the last one the whole answer
    first_part = min(t for t, n in steps if 0 < n < len(shown))
    assert first_part < max(t for t, n in steps if n == len(shown))  # part of it was shown before the end
    assert shown == smol.generate(query, temperature=0, top_p=1.0, max_new_tokens=48)
