"""The demo page and the shipped runs: each shipped run loads and answers (no Gradio needed), the
sketch preprocessing gives the digits classifier what it was trained on, and the page works in
headless Chromium (skipped, with the reason, where Gradio, Selenium or Chromium is missing).

``MLPMIXER_DEMO_SCREENSHOTS=docs python -m pytest tests/test_demo.py -k chromium`` also saves a
screenshot of each tab (docs/demo-fill.png, demo-generate.png, demo-classify.png).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmixer import demo, pretrained, runs
from mlpmixer.errors import UsageError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def shipped() -> dict[str, demo.DemoRun]:
    return {run.name: run for run in demo.open_runs()}


@pytest.fixture(scope="module")
def val_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits classifier's validation images (N, 8, 8) in [0, 1] and labels: never trained on."""
    from mlpmixer.data.images import load_digits

    val = load_digits().val
    return val.images[:, 0].numpy(), val.labels.numpy()


# --- the shipped runs ------------------------------------------------------------------------------

def test_shipped_runs_are_small_run_directories():
    allowed = {"config.json", "model.safetensors", "vocab.json", "metrics.jsonl"}
    for name, (task, _) in pretrained.SHIPPED.items():
        path = pretrained.resolve(name)
        assert path == pretrained.HOME / name and runs.is_run(path)
        assert runs.read_run_config(path)["task"] == task
        files = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors"} <= files <= allowed, files
        assert ("vocab.json" in files) == (task != "vision")
        assert sum(p.stat().st_size for p in path.iterdir()) < 4_000_000


def test_resolve_prefers_your_runs_and_explains_a_bad_name(tmp_path, monkeypatch):
    assert pretrained.resolve("digits") == pretrained.HOME / "digits"
    shutil.copytree(pretrained.HOME / "digits", tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    assert pretrained.resolve("digits") == Path("digits")  # a run folder of yours wins over a shipped name
    assert pretrained.resolve(tmp_path) == tmp_path  # an existing folder: the readers say what is wrong
    with pytest.raises(UsageError, match=r"'shakespeare-lmm' does not exist and is not a shipped run \(did you mean 'shakespeare-lm'\?\).*"
                                         r"shakespeare-mlm, shakespeare-lm, digits"):
        pretrained.resolve("shakespeare-lmm")


def test_shipped_mlm_fills_a_masked_sentence(shipped):
    run = shipped["shakespeare-mlm"]
    filled, table = demo.fill_table(run, "To be, or not to b_, that is th_", top_k=3)
    assert filled == "To be, or not to be, that is the"
    assert table.count("<tr>") == 3 and "%" in table  # a header and a row per blank
    # a few blanks whose answer is plain from the context: most must be right
    cases = {"My lord, I will not g_ with you": "o", "What say y_u, my lord?": "o", "I th_nk you, sir.": "a",
             "Good m_rrow, cousin.": "o", "the king is dea_.": "d", "I pray you, sir, tell m_ what": "e"}
    right = sum(demo.fill_table(run, text)[0] == text.replace("_", ch) for text, ch in cases.items())
    assert right >= 4, right


def test_shipped_lm_generates_shakespeare_like_text(shipped):
    run = shipped["shakespeare-lm"]
    texts = list(demo.generate_text(run, "ROMEO:\n", length=20, temperature=0.8, seed=0))
    assert len(texts) == 20 and texts[-1].startswith("ROMEO:\n") and len(texts[-1]) == len("ROMEO:\n") + 20
    assert texts == list(demo.generate_text(run, "ROMEO:\n", length=20, temperature=0.8, seed=0))  # seeded
    assert set(texts[-1]) <= set(run.tok.stoi)
    # it has learned English: a real line is far likelier than the same characters shuffled
    line = "And all the men and women merely players;"
    shuffled = "".join(np.random.default_rng(0).permutation(list(line)))
    assert bits_per_char(run, line) < 0.6 * bits_per_char(run, shuffled)
    assert bits_per_char(run, line) < 3.0


def bits_per_char(run: demo.DemoRun, text: str) -> float:
    ids = run.tok.encode(text)[None]
    with torch.no_grad():
        logits = run.model(ids[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])) / math.log(2)


def test_shipped_digits_classifies_validation_digits(shipped, val_digits):
    run = shipped["digits"]
    images, labels = val_digits
    predicted = [int(max(demo.classify(run, image)[0].items(), key=lambda kv: kv[1])[0]) for image in images[:60]]
    assert np.mean(np.array(predicted) == labels[:60]) >= 0.9
    top, seen = demo.classify(run, images[0])
    assert len(top) == 5 and 0 < sum(top.values()) <= 1 + 1e-6 and seen.shape == (8, 8)


def test_wrong_input_is_one_sentence(shipped, tmp_path):
    with pytest.raises(ValueError, match="no mask character"):
        demo.fill_table(shipped["shakespeare-mlm"], "no blank here")
    with pytest.raises(UsageError, match="empty"):
        demo.fill_table(shipped["shakespeare-mlm"], "  ")
    with pytest.raises(UsageError, match="prompt is empty"):
        list(demo.generate_text(shipped["shakespeare-lm"], ""))
    with pytest.raises(UsageError, match="'shakespeare-lm' is a 'lm' run; the fill tab needs an mlm run"):
        demo.fill_table(shipped["shakespeare-lm"], "a_c")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        demo.classify(shipped["digits"], str(bad))
    with pytest.raises(UsageError, match="blank"):
        demo.classify(shipped["digits"], np.full((50, 50), 255, dtype=np.uint8))


def test_missing_gradio_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'mlpmixer\[demo\]'"):
        demo.import_gradio()


# --- the sketch preprocessing ----------------------------------------------------------------------

def drawing(digit: np.ndarray, zoom: int, at: tuple[int, int], canvas: int = 300, rgba: bool = False) -> np.ndarray:
    """An 8x8 digit as a sketchpad gives it: dark ink on white (or on transparent), large, anywhere."""
    ink = np.kron(digit, np.ones((zoom, zoom)))
    if rgba:  # black strokes whose opacity is the ink, on a transparent canvas
        image = np.zeros((canvas, canvas, 4), dtype=np.uint8)
        image[at[0]: at[0] + 8 * zoom, at[1]: at[1] + 8 * zoom, 3] = (ink * 255).round()
        return image
    image = np.full((canvas, canvas, 3), 255, dtype=np.uint8)
    image[at[0]: at[0] + 8 * zoom, at[1]: at[1] + 8 * zoom] = ((1 - ink) * 255).round()[..., None]
    return image


def test_to_digit_undoes_polarity_position_size_and_transparency(val_digits):
    images, _ = val_digits
    for digit in images[:20]:
        expected = demo.to_digit(drawing(digit, 16, (150, 150)))
        assert expected.shape == (8, 8) and expected.dtype == np.float32 and expected.max() == 1.0
        for zoom, at, rgba in ((16, (10, 30), False), (32, (0, 44), False), (20, (100, 5), True)):
            np.testing.assert_allclose(demo.to_digit(drawing(digit, zoom, at, rgba=rgba)), expected, atol=0.01)


def test_to_digit_of_a_training_digit_is_the_digit_centred(val_digits):
    images, _ = val_digits
    for digit in images[:50]:
        got, cols = demo.to_digit(digit), np.flatnonzero((digit > demo.INK_THRESHOLD).any(0))
        shift = (8 - len(cols)) // 2 - cols[0]  # the ink's box is centred, rows already fill all 8
        np.testing.assert_allclose(got, np.roll(digit, shift, axis=1) / digit.max(), atol=1e-6)


def test_to_digit_refuses_a_blank_image():
    with pytest.raises(UsageError, match="blank"):
        demo.to_digit(np.zeros((280, 280, 4), dtype=np.uint8))  # an untouched sketchpad: all transparent


def test_drawings_are_classified_like_the_digits_they_show(shipped, val_digits):
    images, labels = val_digits
    run = shipped["digits"]
    drawn = [demo.classify(run, drawing(d, 24, (30, 60), rgba=i % 2 == 1))[0] for i, d in enumerate(images[:40])]
    predicted = [int(max(top.items(), key=lambda kv: kv[1])[0]) for top in drawn]
    assert np.mean(np.array(predicted) == labels[:40]) >= 0.9


# --- the page in headless Chromium -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_or_skip():
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'mlpmixer[demo]'")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to list every request the page made
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path, val_digits):
    driver = browser_or_skip()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    page = demo.serve(host="127.0.0.1", port=port, block=False)  # the three shipped runs
    shots = os.environ.get("MLPMIXER_DEMO_SCREENSHOTS")
    wait = WebDriverWait(driver, 30)
    try:
        url = f"http://127.0.0.1:{port}/"
        driver.get(url)

        def value(css: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value") or ""

        def tab(name: str) -> None:
            driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()

        def typed(css: str, text: str) -> None:
            box = driver.find_element(By.CSS_SELECTOR, css)
            box.clear()
            box.send_keys(text)

        # fill: the top candidates of each blank
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fill-input textarea"))
        typed("#fill-input textarea", "To be, or not to b_, that is th_")
        driver.find_element(By.ID, "fill-button").click()
        wait.until(lambda d: value("#fill-output textarea"))
        assert value("#fill-output textarea") == "To be, or not to be, that is the"
        candidates = driver.find_element(By.ID, "fill-candidates").text
        assert "e " in candidates and "%" in candidates, candidates
        save(driver, shots, "demo-fill.png")

        # generate: streamed into the output box
        tab("Generate")
        typed("#generate-input textarea", "ROMEO:\n")
        driver.find_element(By.ID, "generate-button").click()
        wait.until(lambda d: len(value("#generate-output textarea")) >= len("ROMEO:\n") + 200)
        assert value("#generate-output textarea").startswith("ROMEO:\n")
        save(driver, shots, "demo-generate.png")

        # classify: upload a black-on-white digit as a person would scan it ...
        images, labels = val_digits
        i = int(np.flatnonzero(labels != 7)[0])  # not the digit drawn next, so that the Label must change
        digit_png = tmp_path / "digit.png"
        from PIL import Image

        Image.fromarray(drawing(images[i], 20, (40, 40))).save(digit_png)
        tab("Classify")
        tab("Upload")
        driver.find_element(By.CSS_SELECTOR, "#classify-upload input[type=file]").send_keys(str(digit_png))
        assert top_class(driver, wait) == str(labels[i])

        # ... and draw a 7 on the sketchpad: a bar, then a diagonal
        tab("Draw")
        driver.find_element(By.CSS_SELECTOR, "#classify-sketch button[aria-label='Brush']").click()
        canvas = driver.find_elements(By.CSS_SELECTOR, "#classify-sketch canvas")[-1]
        stroke = ActionChains(driver).move_to_element_with_offset(canvas, -60, -90).click_and_hold()
        for _ in range(12):
            stroke.move_by_offset(10, 0)
        for _ in range(18):
            stroke.move_by_offset(-4, 10)
        stroke.release().perform()
        driver.find_element(By.ID, "classify-draw-button").click()
        assert top_class(driver, wait, previous=str(labels[i])) == "7"
        save(driver, shots, "demo-classify.png")

        # bad input is a message in the page, and the page keeps answering
        tab("Fill")
        typed("#fill-input textarea", "no blank here")
        driver.find_element(By.ID, "fill-button").click()
        wait.until(lambda d: "no mask character" in d.find_element(By.TAG_NAME, "body").text)
        typed("#fill-input textarea", "What say y_u, my lord?")
        driver.find_element(By.ID, "fill-button").click()
        wait.until(lambda d: value("#fill-output textarea") == "What say you, my lord?")

        requested = {json.loads(entry["message"])["message"].get("params", {}).get("request", {}).get("url", "")
                     for entry in driver.get_log("performance")}
        assert any(u.startswith(url + "gradio_api/") for u in requested), "the request log is empty"
        elsewhere = sorted(u for u in requested if u and not u.startswith((url, "data:", "blob:")))
        assert not elsewhere, f"the page fetched from the network: {elsewhere[:5]}"
    finally:
        driver.quit()
        page.close()


def top_class(driver, wait, previous: str | None = None) -> str:
    """The class the page's Label shows on top, once it shows one (other than ``previous``)."""
    from selenium.webdriver.common.by import By

    css = "#classify-label [data-testid='label-output-value']"  # Gradio's Label: the top class's heading

    def shown(d):
        found = d.find_elements(By.CSS_SELECTOR, css)
        return found and found[0].text and found[0].text != previous and found[0].text
    return wait.until(shown)


def save(driver, folder: str | None, name: str) -> None:
    if folder:
        time.sleep(0.5)  # let the last update paint
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def test_demo_command_line():
    import argparse

    parser = argparse.ArgumentParser(prog="mlpmixer")
    demo.add_demo_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "digits", "runs/mlm", "--port", "8000", "--host", "0.0.0.0"])
    assert (args.runs, args.port, args.host, args.handler) == (["digits", "runs/mlm"], 8000, "0.0.0.0", demo.cmd_demo)
    args = parser.parse_args(["demo"])
    assert (args.runs, args.port, args.host) == ([], 7860, "127.0.0.1")
    with pytest.raises(UsageError, match="--port must be between 1 and 65535, got 70000"):
        demo.cmd_demo(parser.parse_args(["demo", "--port", "70000"]))
    with pytest.raises(UsageError, match="'nowhere' does not exist and is not a shipped run"):
        demo.open_runs(["nowhere"])


def test_a_busy_port_is_one_sentence():
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'mlpmixer[demo]'")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot serve on 127.0.0.1:{port}: the port is in use.*choose another with --port"):
            demo.serve(["digits"], port=port, block=False)
