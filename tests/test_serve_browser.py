"""`pmf serve`'s page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Selenium through
/usr/bin/chromedriver; tests/install_browser.sh installs both): upload a source, drag two joints, generate, and
check the pose the server received and the image in the gallery; draw a stick figure and check the fitted skeleton.
Saves outputs/serve_page.png."""

import base64
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_fixtures import served, tiny_export, tiny_run  # noqa: F401  (fixtures)
from test_serve_doodle_fit import distance_to_strokes

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# This machine's network is closed: nothing may try to reach out (no sync, updates, component downloads).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,1000")
SCREENSHOT = Path(__file__).resolve().parent.parent / "outputs" / "serve_page.png"
WAIT_S = 60


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("Chromium is not installed: run `bash tests/install_browser.sh` (make test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="pmf-chromium-") as profile:
        for flag in FLAGS + (f"--user-data-dir={profile}",):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver, script):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(script))


def pointer_path(driver, canvas, points, scale):
    """Presses at the first point (source pixels), moves through the others, releases."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                 canvas)
    css = [(round((x + 0.5) * scale - rect[0] / 2), round((y + 0.5) * scale - rect[1] / 2)) for x, y in points]
    actions = ActionChains(driver, duration=10).move_to_element_with_offset(canvas, *css[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(css[:-1], css[1:]):
        actions = actions.move_by_offset(x1 - x0, y1 - y0)
    actions.release().perform()
    return css


def test_drag_two_joints_generate_and_fit_a_doodle(served, browser):
    driver = browser
    driver.get(served.url + "/")
    wait_for(driver, "return document.body.dataset.ready === 'true'")
    driver.find_element("id", "source-file").send_keys(str(served.source))
    wait_for(driver, "return document.getElementById('source-line').textContent.startsWith('64x64')")
    canvas = driver.find_element("id", "editor")
    scale = driver.execute_script("return window.pmf.editor.stage.scale")
    before = np.asarray(driver.execute_script("return window.pmf.editor.keypoints()"))

    # Drag the right wrist and the left ankle by whole CSS pixels: offsets / scale in source pixels.
    moves = {4: (36, -24), 13: (-30, 18)}
    for joint, (dx, dy) in moves.items():
        x, y = before[joint, :2]
        grab = ((round((x + 0.5) * scale) + 0.5) / scale - 0.5, (round((y + 0.5) * scale) + 0.5) / scale - 0.5)
        pointer_path(driver, canvas, [grab, (grab[0] + dx / scale, grab[1] + dy / scale)], scale)
    driver.find_element("id", "generate").click()
    wait_for(driver, "return document.querySelectorAll('#gallery img.result').length > 0")

    received = json.loads(driver.find_element("id", "received-pose").get_attribute("textContent"))
    assert received["canvas_width"] == 64 and received["canvas_height"] == 64
    after = np.asarray(received["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    expected = before.copy()
    for joint, (dx, dy) in moves.items():
        expected[joint, :2] += (dx / scale, dy / scale)
    assert np.abs(after - expected).max() <= 0.05, (after - expected)  # both rounded to 0.01 by the page
    assert (np.abs(after[[4, 13], :2] - before[[4, 13], :2]) > 2).all()
    src = driver.find_element("css selector", "#gallery img.result").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (64, 64)

    # A stick figure: head circle, torso, bent arms and legs (source pixels); fit; the editor shows the skeleton.
    driver.find_element("id", "tab-doodle").click()
    angles = np.linspace(0, 2 * np.pi, 17)
    head = [(32 + 5 * np.cos(a), 10 + 5 * np.sin(a)) for a in angles]
    strokes = [head, [(32, 15), (32, 38)], [(32, 19), (23, 27), (19, 37)], [(32, 19), (41, 25), (47, 15)],
               [(32, 38), (26, 49), (25, 60)], [(32, 38), (39, 49), (41, 60)]]
    doodle = driver.find_element("id", "doodle")
    for stroke in strokes:
        pointer_path(driver, doodle, stroke, scale)
    drawn = driver.execute_script("return window.pmf.doodle.strokes")
    assert len(drawn) == len(strokes)
    driver.find_element("id", "doodle-fit").click()
    wait_for(driver, "return !document.getElementById('panel-joints').hidden")
    fitted = np.asarray(driver.execute_script("return window.pmf.editor.keypoints()"))
    tolerance = 1.5  # source pixels (a CSS pixel of rounding is 1/6 of one)
    for j in range(1, 14):  # every body joint (neck to ankles) lies on what was drawn
        assert fitted[j, 2] == 1 and distance_to_strokes(fitted[j, :2], drawn[1:]) <= tolerance, j
    for j, point in {0: (32, 10), 4: (19, 37), 7: (47, 15), 10: (25, 60), 13: (41, 60), 3: (23, 27), 6: (41, 25),
                     9: (26, 49), 12: (39, 49)}.items():
        assert np.linalg.norm(fitted[j, :2] - point) <= tolerance, (j, fitted[j], point)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(SCREENSHOT))
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
