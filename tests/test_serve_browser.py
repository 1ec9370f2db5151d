"""The page at / in a real headless Chromium, driven through chromedriver's W3C WebDriver HTTP protocol: type
a prompt, press Generate, and see the image appear and the progress bar reach 100%."""
import base64
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("uvicorn", reason="sdcore serve needs the serve extra: `make test` installs uvicorn")
from serve_helpers import free_port  # noqa: E402
from test_serve_e2e import Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriver:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                self.call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.loads(response.read())["value"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def find(self, css):
        found = self.s("POST", "/element", {"using": "css selector", "value": css})
        assert ELEMENT in found, found
        return found[ELEMENT]

    def type(self, css, text, clear=True):
        element = self.find(css)
        if clear:
            self.s("POST", f"/element/{element}/clear", {})
        self.s("POST", f"/element/{element}/value", {"text": text})

    def script(self, source):
        return self.s("POST", "/execute/sync", {"script": source, "args": []})

    def quit(self):
        try:
            self.s("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


def test_type_a_prompt_press_generate_see_the_image_and_100_percent(tmp_path):
    server = Server("--queue", "2")
    driver = WebDriver()
    try:
        driver.s("POST", "/url", {"url": server.url + "/"})
        end = time.monotonic() + 30
        while driver.script("return document.querySelectorAll('#sampler_name option').length") == 0:
            assert time.monotonic() < end, "the form never filled its sampler list from the API"
            time.sleep(0.1)
        driver.type("#prompt", "a lighthouse at dusk")
        # long enough (~3 s here) that the page's 250 ms polls see the bar between 0% and 100%
        for field, value in (("#steps", "150"), ("#width", "256"), ("#height", "256"), ("#seed", "21")):
            driver.type(field, value)
        driver.s("POST", f"/element/{driver.find('#generate')}/click", {})
        seen = set()
        end = time.monotonic() + 90
        while not driver.script("return document.querySelectorAll('#grid img').length"):
            assert time.monotonic() < end, driver.script("return document.body.innerText")
            seen.add(driver.script("return document.getElementById('percent').textContent"))
            time.sleep(0.05)
        assert driver.script("return document.getElementById('percent').textContent") == "100%"
        assert driver.script("return document.getElementById('progress').getAttribute('aria-valuenow')") == "100"
        assert driver.script("return document.getElementById('error').textContent") == ""
        width = driver.script("return document.querySelector('#grid img').naturalWidth")
        caption = driver.script("return document.querySelector('#grid figcaption').textContent")
        assert width == 256 and caption.startswith("a lighthouse at dusk\n") and "Seed: 21," in caption
        assert any(p not in ("0%", "100%") for p in seen), seen  # the bar moved while the job ran
        time.sleep(0.5)  # the bar's 0.2 s width transition, for the screenshot
        (tmp_path / "page.png").write_bytes(base64.b64decode(driver.s("GET", "/screenshot")))
    finally:
        driver.quit()
        server.stop()
