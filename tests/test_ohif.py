"""MONAI Label's bundled OHIF viewer (`/ohif/`) over the app's DICOMweb studies, in headless Chromium.

A real Orthanc holds the uploaded stacks; the app server runs with `--studies http://.../dicom-web`; OHIF
reaches Orthanc through the server's /proxy/dicom/{qido,wado} endpoints (its app-config.js). The browser is
Debian's chromium driven by Debian's chromedriver (nothing is downloaded), and it resolves no host but
127.0.0.1: the page's web fonts from the internet fail to load, as they would offline.
"""

import io
import json
import os
import re
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from live_server import SAMPLES, LiveServer
from qunet.dicomweb import stack_to_series, upload

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HINT = "run .ci/services.sh (installs the Debian packages chromium and chromium-driver) and pip install selenium"
# pick: the paper's order, which the assertions below check (S0 best quality first, then the lowest Q)
TINY_CONF = {"patch_size": "32", "features": "8,8,16,16,32,8", "slices_per_sample": "4", "q0": "1.01", "pick": "paper"}


@pytest.fixture(scope="module")
def studies(orthanc_server) -> dict:
    """A synthetic CT (sample-data/ct1) and the real breast MRI, uploaded; name -> (study uid, slices)."""
    stacks = {"ct1": (SAMPLES / "ct1.nii.gz", "CT"), "breast1": (SAMPLES / "breast1.nrrd", "MR")}
    found = {}
    for name, (path, modality) in stacks.items():
        upload([path], orthanc_server, modality=modality)
        series = stack_to_series(path, modality=modality)
        found[name] = {
            "study": str(series[0].StudyInstanceUID),
            "series": str(series[0].SeriesInstanceUID),
            "slices": len(series),
            "modality": modality,
        }
    return found


@pytest.fixture(scope="module")
def server(orthanc_server, studies, tmp_path_factory):
    root = tmp_path_factory.mktemp("ohif")
    env = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": ["CT", "MR"]}),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
    }
    srv = LiveServer(orthanc_server, root, conf=TINY_CONF, env=env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {HINT}", pytrace=False)
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: {HINT}", pytrace=False)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1400,900",
        "--force-device-scale-factor=1",
        "--enable-unsafe-swiftshader",  # WebGL in software (Cornerstone3D renders with it) without a GPU
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # loopback only
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_until(condition, timeout: float, what: str, driver=None):
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        try:
            value = condition()
        except Exception as e:  # the page is still being built
            value = e
        if value and not isinstance(value, Exception):
            return value
        time.sleep(0.5)
    text = driver.find_element("tag name", "body").text[-2000:] if driver else ""
    raise TimeoutError(f"{what}: still {value!r} after {timeout} s. Page text:\n{text}")


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def click_button(driver, label: str) -> None:
    driver.find_element("xpath", f"//button[normalize-space()='{label}']").click()


def dismiss_banner(driver) -> None:
    for button in driver.find_elements("xpath", "//button[normalize-space()='Confirm and Hide']"):
        button.click()  # "OHIF Viewer is for investigational use only" covers the bottom of the viewport


CANVAS_STATS = """
const canvas = document.querySelector('canvas.cornerstone-canvas');
if (!canvas || !canvas.width || !canvas.height) return null;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let n = 0, sum = 0, sq = 0, bright = 0; const levels = new Set();
for (let i = 0; i < data.length; i += 4) {
  const y = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
  n++; sum += y; sq += y * y; if (y > 40) bright++; levels.add(Math.round(y));
}
const r = canvas.getBoundingClientRect();
return {std: Math.sqrt(sq / n - (sum / n) ** 2), bright: bright / n, levels: levels.size,
        rect: [r.x, r.y, r.width, r.height]};
"""


def test_study_list_opens_a_study_with_its_image(server, studies, browser, tmp_path):
    browser.get(f"{server.url}/ohif/")
    # the study list comes from Orthanc through the server's /proxy/dicom/qido: both uploads, by PatientID
    wait_until(lambda: all(name in page_text(browser) for name in studies), 90, "the study list", browser)
    assert re.search(rf"\b{len(studies)}\s*Studies", page_text(browser)), page_text(browser)
    dismiss_banner(browser)

    # open the real MRI: its row unfolds into its series, then the basic viewer
    browser.find_element("xpath", "//*[normalize-space(text())='breast1']").click()
    wait_until(
        lambda: browser.find_element("xpath", "//button[normalize-space()='Basic Viewer']"), 30, "the modes", browser
    )
    expanded = page_text(browser)
    assert "MR" in expanded and str(studies["breast1"]["slices"]) in expanded
    click_button(browser, "Basic Viewer")
    wait_until(lambda: studies["breast1"]["study"] in browser.current_url, 30, "the viewer URL", browser)
    assert "/ohif/viewer" in browser.current_url

    # the viewport draws the series: a non-uniform canvas, at the first of its 21 images (InstanceNumber 1 = slice 0)
    stats = wait_until(
        lambda: (s := browser.execute_script(CANVAS_STATS)) and s["std"] > 15 and s,
        90,
        "an image in the viewport",
        browser,
    )
    assert stats["levels"] > 50 and stats["bright"] > 0.05, stats
    wait_until(lambda: f"(1/{studies['breast1']['slices']})" in page_text(browser), 30, "the image counter", browser)
    dismiss_banner(browser)
    time.sleep(1)

    png = browser.get_screenshot_as_png()
    (tmp_path / "ohif-viewer.png").write_bytes(png)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    x, y, w, h = (int(round(v)) for v in browser.execute_script(CANVAS_STATS)["rect"])
    viewport = shot[y : y + h, x : x + w]
    assert viewport.size > 100_000  # the viewport takes most of the window
    assert viewport.std() > 15, "the screenshot's viewport is flat: no image drawn"
    # the middle of the viewport (where the breast is) has structure, not just a frame or text
    middle = viewport[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    assert middle.std() > 15 and (middle > 40).mean() > 0.1


def test_monai_label_panel_connects_to_the_app(server, studies, browser, tmp_path):
    """OHIF's MONAI Label mode: the panel reads the app's /info/, and its Next Sample opens a study of the datastore.

    MONAI Label 0.8.5's OHIF panel never applies its Strategy list (its onChange handler is missing): Next
    Sample always asks for "random", which the app answers with its QU-net++ pick: the dialog shows the slices
    to annotate in its Patient ID row (see docs/dicomweb.md).
    """
    from selenium.webdriver.support.ui import Select

    browser.get(f"{server.url}/ohif/")
    # the panel talks to the server in this cookie (default: this host on port 8000)
    browser.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": f"{server.url}/", "path": "/"})
    browser.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={studies['ct1']['study']}")
    dismiss_banner(browser)
    url_box = wait_until(
        lambda: browser.find_element("id", "monailabelServerURL"), 90, "the MONAI Label panel", browser
    )
    assert url_box.get_attribute("value") == f"{server.url}/"
    url_box.find_element("xpath", "following::button[1]").click()  # connect
    wait_until(
        lambda: "Auto-Segmentation" in page_text(browser),
        60,
        "the panel's sections (the panel fails when /info/ 'labels' is a dict, not a list)",
        browser,
    )
    text = page_text(browser)
    assert "QU-net++" in text and "qunet" in text  # the app's name and its segmentation model
    stats = wait_until(
        lambda: (s := browser.execute_script(CANVAS_STATS)) and s["std"] > 15 and s,
        90,
        "an image in the viewports",
        browser,
    )
    assert stats["levels"] > 50

    browser.find_element("xpath", "//*[normalize-space(text())='Active Learning']").click()
    strategies = Select(browser.find_element("xpath", "//select[option[@value='qunet']]"))
    assert {o.get_attribute("value") for o in strategies.options} >= {"qunet", "random"}
    click_button(browser, "Next Sample")
    form = wait_until(
        lambda: "Series Instance UID" in page_text(browser) and page_text(browser),
        120,
        "the Next sample dialog",
        browser,
    )
    shown = [s for s in studies.values() if s["study"] in form and s["series"] in form]
    assert len(shown) == 1, form  # a series of the datastore, with the study its OK button opens
    browser.save_screenshot(str(tmp_path / "ohif-next-sample.png"))
    if os.environ.get(
        "QUNET_SCREENSHOTS"
    ):  # the documentation's picture: QUNET_SCREENSHOTS=docs pytest tests/test_ohif.py
        browser.save_screenshot(os.path.join(os.environ["QUNET_SCREENSHOTS"], "ohif-next-sample.png"))
    # the QU-net++ pick: the slices in the dialog are the series' first S0 slices, recorded as served
    found = re.search(r"annotate slices \(K\) ([\d, ]+)", form)
    assert found, form
    slices = [int(k) for k in found.group(1).split(",")]
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": shown[0]["series"]}, timeout=30).json()
    assert slices == info["qunet_quality"]["initial"][: len(slices)]
    assert info["qunet_served"]["anonymous"]["slices"] == slices
