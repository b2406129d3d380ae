"""The playground page in a real browser (Debian's headless Chromium through selenium and chromedriver) against
the session's steer server: it lists every served steer with its keywords (the words /v1/steer_keywords
answers), a preset sets its sliders, a slider moved by keyboard sets its value, the steered column streams
exactly what the API answers for the same values and differs from the unsteered column beside it, a sweep
shows one column per value, and a value out of range shows the server's 400 message in its column while the
other column still streams.

Set VLLM_STEER_PLAYGROUND_SCREENSHOT=path to save the page after a generation (docs/playground.png is one)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from helpers import PRESETS, client, open_playground, text_of
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

PROMPT = "The movie I watched last night was"
MAX_TOKENS = 16


def set_field(browser, element_id: str, value) -> None:
    """Type into a field as a user would, so its input handlers run."""
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def generate(browser, button: str) -> None:
    browser.execute_script("document.getElementById('status').textContent = ''")
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 180).until(lambda d: text_of(d, "status") == "done")


def api_text(server, xargs: dict) -> str:
    c = client(server)
    model = next(m.id for m in c.models.list().data if m.parent is None)
    chunks = c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                  extra_body={"vllm_xargs": xargs} if xargs else None)
    return "".join(ch.choices[0].text for ch in chunks if ch.choices)


def test_the_page_lists_every_steer_with_its_keywords(browser, servers):
    s = servers["steer"]
    open_playground(browser, s)
    steers = httpx.get(s.url + "/steers", timeout=30).json()["data"]
    for steer in steers:
        slider = browser.find_element(By.ID, f"slider-{steer['name']}")
        assert float(slider.get_attribute("max")) == steer["max_abs_value"]
    for name in ("detox", "sentiment"):
        WebDriverWait(browser, 60).until(lambda d, n=name: "promotes" in text_of(d, f"keywords-{n}"))
        kw = httpx.get(s.url + "/steer_keywords", params={"steer": name}, timeout=60).json()
        shown = text_of(browser, f"keywords-{name}")
        assert ", ".join(w["word"] for w in kw["promoted"]) in shown
        assert ", ".join(w["word"] for w in kw["suppressed"]) in shown
    assert {o.get_attribute("value") for o in Select(browser.find_element(By.ID, "preset")).options} == \
        {"", *PRESETS}


def open_with_prompt(browser, server, max_tokens: int = MAX_TOKENS) -> None:
    open_playground(browser, server)
    set_field(browser, "prompt", PROMPT)
    set_field(browser, "max-tokens", max_tokens)


def test_the_steered_column_is_what_the_api_answers(browser, servers):
    s = servers["steer"]
    open_with_prompt(browser, s)
    Select(browser.find_element(By.ID, "preset")).select_by_value("alpha-strong")
    assert browser.find_element(By.ID, "value-alpha").get_attribute("value") == "5"
    browser.find_element(By.ID, "slider-sentiment").send_keys(Keys.ARROW_RIGHT * 8)  # the slider, 8 steps of 0.5
    assert browser.find_element(By.ID, "value-sentiment").get_attribute("value") == "4"
    generate(browser, "generate")
    steered, unsteered = text_of(browser, "out-steered"), text_of(browser, "out-unsteered")
    assert steered == api_text(s, {"steer_alpha": 5, "steer_sentiment": 4})
    assert unsteered == api_text(s, {})
    assert steered != unsteered and text_of(browser, "error-steered") == ""
    if target := os.environ.get("VLLM_STEER_PLAYGROUND_SCREENSHOT"):
        Path(target).write_bytes(browser.get_screenshot_as_png())


def test_a_sweep_shows_one_column_per_value(browser, servers):
    s = servers["steer"]
    open_with_prompt(browser, s)
    Select(browser.find_element(By.ID, "sweep-steer")).select_by_value("detox")
    generate(browser, "sweep")
    texts = [text_of(browser, f"out-sweep-{i}") for i in range(5)]
    assert texts[2] == api_text(s, {}) and texts[4] == api_text(s, {"steer_detox": 5})
    assert len(set(texts)) > 1


def test_a_refused_value_shows_the_servers_message(browser, servers):
    s = servers["steer"]
    open_with_prompt(browser, s, max_tokens=4)
    set_field(browser, "value-beta", 500)  # beta is bounded at 20 on this server
    generate(browser, "generate")
    assert "beyond the allowed range" in text_of(browser, "error-steered")
    assert text_of(browser, "out-steered") == ""
    assert text_of(browser, "out-unsteered") and text_of(browser, "error-unsteered") == ""
