"""The serve page and evaluate's report.html in a real browser (headless Chromium).

Each page must load with every image decoded, no console error (a blocked
request, a CSP violation and a script error all are one) and no request leaving
the machine. On the serve page a real photo is uploaded through the file input
and the predicted label is read from the page: it must be the API's answer for
those bytes.

Skipped, with the reason, where Chromium, its driver (Debian: `apt-get install
chromium chromium-driver`) or selenium is absent. The screenshots go to
$TLFRAME_SCREENSHOT_DIR if set (`TLFRAME_SCREENSHOT_DIR=docs` rewrites the docs' ones),
else to the test's temp dir.
"""

import base64
import hashlib
import http.client
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from production_fixtures import trained_model  # pylint: disable=unused-import  (a fixture)
from production_fixtures import CLASSES
from tlframe.serve import page
from test_serve import Server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "bin", "evaluate")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)
CHROMEDRIVER = shutil.which("chromedriver")
WINDOW = (1000, 640)
MAX_SCREENSHOT_HEIGHT = 4000
WAIT_S = 60
# Screenshots are palette PNGs: a page is mostly flat colour; they stay small in git.
SCREENSHOT_COLOURS = 128

# Marks, not fixture skips: they skip before the session's model is trained.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium not found (chromium and chromedriver on PATH; Debian: "
           "apt-get install chromium chromium-driver)")
needs_selenium = pytest.mark.skipif(importlib.util.find_spec("selenium") is None,
                                    reason="selenium is not installed: pip install -e '.[test]'")

# Every image decoded: complete, with pixels (a broken one is complete with width 0).
_IMAGES_STATE = """return Array.from(document.images).map(
    image => [image.currentSrc.slice(0, 80), image.complete && image.naturalWidth > 0]);"""
_DROP = """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));"""
_RESOURCES = "return performance.getEntriesByType('resource').map(entry => entry.name);"


@pytest.fixture(scope="module")
def browser():
  # pylint: disable=import-outside-toplevel  (selenium is optional: see needs_selenium)
  from selenium import webdriver
  from selenium.webdriver.support.ui import WebDriverWait
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--hide-scrollbars", "--force-device-scale-factor=1",
                   f"--window-size={WINDOW[0]},{WINDOW[1]}"):
    options.add_argument(argument)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
  driver = webdriver.Chrome(options=options, service=service)
  driver.wait = WebDriverWait(driver, WAIT_S)  # .until(condition of the driver)
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory):
  return os.environ.get("TLFRAME_SCREENSHOT_DIR") or str(tmp_path_factory.mktemp("screenshots"))


def _console_errors(driver):
  """The console's errors since the last call (reading the log empties it)."""
  return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _assert_images_load(driver):
  images = driver.execute_script(_IMAGES_STATE)
  assert all(loaded for _, loaded in images), f"images that did not load: {images}"
  return len(images)


def _save_screenshot(driver, path):
  """A screenshot of the window as a palette PNG; returns its pixels."""
  image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
  image.quantize(SCREENSHOT_COLOURS, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
  return np.asarray(image)


def _assert_drawn(pixels):
  """A rendered page, not a blank screen: real contrast."""
  assert pixels.shape[0] >= WINDOW[1] // 2 and pixels.shape[1] == WINDOW[0]
  assert pixels.std() > 20


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
  server = Server(trained_model.model_dir, tmp_path_factory.mktemp("browser_server"))
  yield server
  assert server.stop()[0] == 0, server.log()


def _upload(driver, path):
  """Chooses `path` in the page's file input; returns the status line's state and text."""
  driver.find_element("id", "photo").send_keys(str(path))
  status = driver.find_element("id", "status")
  driver.wait.until(lambda _: status.get_attribute("data-state") in ("done", "error"))
  return status.get_attribute("data-state"), status.text


@pytest.mark.slow
@needs_chromium
@needs_selenium
def test_serve_page_classifies_an_uploaded_photo(browser, server, trained_model, tmp_path,
                                                 screenshot_dir):
  photo = tmp_path / "chelsea.jpg"
  photo.write_bytes(tf.io.encode_jpeg(trained_model.photos["chelsea"], quality=90).numpy())
  status, answer = server.predict(
      {"instances": [{"b64": base64.b64encode(photo.read_bytes()).decode("ascii")}]})
  assert status == 200, answer
  expected = answer["predictions"][0]
  base_url = f"http://{server.host}:{server.port}"

  browser.get(base_url + "/")
  browser.wait.until(lambda d: d.find_element("id", "model-version").text.startswith("version "))
  assert browser.find_element("id", "model-name").text == "photos"
  labels = [item.text for item in browser.find_elements("css selector", "#labels li")]
  assert labels == list(CLASSES)
  assert _console_errors(browser) == []

  # A file that is no image: the server's 400 message on the page (and, as a failed
  # request, in the console), no bars.
  notes = tmp_path / "notes.txt"
  notes.write_text("not a photo\n")
  state, text = _upload(browser, notes)
  assert state == "error" and text.startswith("notes.txt: instance 0: ") and "image" in text
  assert not browser.find_elements("css selector", "#bars .bar-row")
  errors = _console_errors(browser)
  assert len(errors) == 1 and ":predict" in errors[0] and "400" in errors[0], errors

  state, text = _upload(browser, photo)
  assert state == "done", text
  predicted = browser.find_element("id", "top-label").text
  assert predicted == expected["top_k_labels"][0] == "chelsea"
  rows = browser.find_elements("css selector", "#bars .bar-row")
  shown = [(row.find_element("class name", "bar-label").text,
            float(row.find_element("class name", "bar-value").text.rstrip("%")))
           for row in rows]
  assert [label for label, _ in shown] == expected["top_k_labels"]
  np.testing.assert_allclose([percent for _, percent in shown],
                             np.array(expected["top_k_probabilities"]) * 100, atol=0.051)
  # Dropped instead of chosen: a drop event carrying the same bytes as a file.
  browser.execute_script(_DROP, base64.b64encode(photo.read_bytes()).decode("ascii"))
  status = browser.find_element("id", "status")
  browser.wait.until(lambda _: status.text.startswith("dropped.jpg")
                     and status.get_attribute("data-state") in ("done", "error"))
  assert status.get_attribute("data-state") == "done", status.text
  assert browser.find_element("id", "top-label").text == predicted
  browser.wait.until(lambda d: d.execute_script("return document.images[0].complete;"))
  assert _assert_images_load(browser) == 1  # the photo's preview
  assert all(url.startswith(base_url + "/") for url in browser.execute_script(_RESOURCES))
  assert _console_errors(browser) == []
  _assert_drawn(_save_screenshot(browser, os.path.join(screenshot_dir, "serve_page.png")))


@pytest.fixture(scope="module")
def evaluation_dir(trained_model, tmp_path_factory):
  """bin/evaluate's output on the four full photos plus two mislabelled ones (mistakes to show).

  Run from its folder with relative paths: the page (and the screenshot) names them so.
  """
  tmp = tmp_path_factory.mktemp("browser_evaluation")
  files = {f"{name}/{name}.jpg": name for name in CLASSES}
  files.update({"coffee/IMG_0007.jpg": "chelsea", "astronaut/IMG_0012.jpg": "rocket"})
  for path, photo in files.items():
    (tmp / "photos" / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp / "photos" / path).write_bytes(
        tf.io.encode_jpeg(trained_model.photos[photo], quality=90).numpy())
  (tmp / "model").symlink_to(trained_model.model_dir)
  result = subprocess.run([sys.executable, EVALUATE, "--model=model", "--image_dir=photos",
                           "--output_dir=evaluation"],
                          cwd=tmp, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "evaluation"


@pytest.mark.slow
@needs_chromium
@needs_selenium
def test_report_html_shows_every_image_without_errors(browser, evaluation_dir, screenshot_dir):
  browser.get((evaluation_dir / "report.html").as_uri())
  browser.wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
  # The plots and the two mistakes' thumbnails at least, each decoded.
  assert _assert_images_load(browser) >= 4
  mistakes = browser.find_elements("css selector", "figure")
  assert {"IMG_0007.jpg", "IMG_0012.jpg"} <= {
      name for figure in mistakes for name in re.findall(r"IMG_\d+\.jpg", figure.text)}
  assert not [url for url in browser.execute_script(_RESOURCES)
              if not url.startswith(("data:", "file:"))]
  assert _console_errors(browser) == []
  # The whole page in one picture: a window whose viewport is as tall as the page.
  height = browser.execute_script("return document.documentElement.scrollHeight"
                                  " + window.outerHeight - window.innerHeight")
  browser.set_window_size(WINDOW[0], min(height, MAX_SCREENSHOT_HEIGHT))
  try:
    _assert_drawn(_save_screenshot(browser, os.path.join(screenshot_dir, "report.png")))
  finally:
    browser.set_window_size(*WINDOW)


def test_serve_page_references_nothing_outside_and_its_policy_allows_only_its_own_code(server):
  connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
  try:
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode("utf-8")
  finally:
    connection.close()
  assert response.status == 200
  assert response.getheader("Content-Type") == "text/html; charset=utf-8"
  # No script, font, stylesheet or image from elsewhere: the only reference is the empty icon.
  assert re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page) == ["data:,"]
  for outside in ("http:", "https:", "url(", "@import", "@font-face"):
    assert outside not in page
  policy = response.getheader("Content-Security-Policy")
  for tag in ("script", "style"):
    (code,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(code.encode("utf-8")).digest()).decode("ascii")
    assert f"{tag}-src 'sha256-{digest}';" in policy
  assert policy.startswith("default-src 'none';") and "connect-src 'self';" in policy
  assert '<meta name="tlframe-model" content="photos">' in page


def test_serve_page_escapes_the_model_name():
  body = page.Page('<img src=x onerror="alert(1)">').body.decode("utf-8")
  assert "<img" not in body
  assert 'content="&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"' in body
