"""Helpers of the browser tests: a `tokenmill serve` process and a headless Chromium page.

The server is the real command line in a subprocess on a free loopback port; the page is
Debian's ``chromium`` driven through ``chromedriver`` by Selenium. Every page collects the
browser console and fails its test on a SEVERE entry, save network failures the test said
it expects (a 401 before the key is given, a 400 the test provoked).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("TOKENMILL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TOKENMILL_CHROMEDRIVER", "/usr/bin/chromedriver")
API_KEY = "browser-test-key"
#: where the docs' screenshots go when the suite runs for them (scripts/screenshots.py)
DOC_SHOTS = os.environ.get("TOKENMILL_DOC_SCREENSHOTS")
KEY_STORAGE = "tokenmill.apiKey"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} is missing: install Debian's {package} package (apt-get install -y {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


class Server:
    """``tokenmill serve ARGS`` until stop(); ``url`` is where it listens."""

    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 120) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("TOKENMILL_API_KEY", None)
        if api_key:
            env["TOKENMILL_API_KEY"] = api_key
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli.main", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stderr], daemon=True).start()
        self._lines = lines
        end = time.monotonic() + timeout
        self.url = None
        # the LLM's line comes last when there is one; pipelines-only servers log theirs
        want = "tokenmill serving pipelines" if "--model" not in args else "tokenmill serving "
        while self.url is None:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:  # exited without a last line: its log says why
                    time.sleep(0.2)
                    raise RuntimeError("tokenmill serve exited:\n" + self.drain_log()) from None
                if time.monotonic() > end:
                    self.stop()
                    raise RuntimeError("tokenmill serve did not start:\n" + self.drain_log()) from None
                continue
            self.log.append(line)
            m = re.search(r"tokenmill serving (?!pipelines)\S+ at (http://\S+)", line) or (
                want == "tokenmill serving pipelines"
                and re.search(r"serving pipelines .* at (http://\S+)", line)
            )
            if m:
                self.url = m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError("tokenmill serve exited:\n" + "".join(self.log))

    def drain_log(self) -> str:
        while not self._lines.empty():
            self.log.append(self._lines.get())
        return "".join(self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Page:
    """One headless Chromium tab on the playground, with waits and screenshots."""

    def __init__(self, base_url: str, out_dir: Path, *, api_key: str | None = None, size=(1280, 900)) -> None:
        from selenium import webdriver
        from selenium.common.exceptions import SessionNotCreatedException
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        profile = out_dir / "chromium-profile"  # its own profile: no state shared between tests
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
        ):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        except SessionNotCreatedException:
            # on a loaded machine Chromium can miss chromedriver's start-up deadline once
            time.sleep(1)
            self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.base_url = base_url
        self.out_dir = out_dir
        self.allowed_network: list[str] = []
        self.console: list[dict[str, Any]] = []
        if api_key:
            # as if the user had typed the key once in this tab: it is in sessionStorage
            # before the page's own script runs
            self.driver.execute_cdp_cmd(
                "Page.addScriptToEvaluateOnNewDocument",
                {"source": f"sessionStorage.setItem({KEY_STORAGE!r}, {api_key!r});"},
            )

    # -- navigation and waits -------------------------------------------------------
    def open(self, hash_: str = "#/") -> Page:
        self.driver.get(f"{self.base_url}/{hash_}")
        self.wait(lambda: self.js("return document.body.dataset.ready === '1'"), what="the page to load")
        return self

    def go(self, hash_: str) -> None:
        """Switch views inside the page (no reload)."""
        self.js(f"location.hash = {hash_!r}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, cond: Callable[[], Any], timeout: float = 30, what: str = "a condition") -> Any:
        end = time.monotonic() + timeout
        while True:
            try:
                value = cond()
            except Exception:  # the element may not exist yet
                value = None
            if value:
                return value
            if time.monotonic() > end:
                self.shot("timeout")
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    def el(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.el(css).text

    def wait_el(self, css: str, timeout: float = 30):
        return self.wait(lambda: self.el(css).is_displayed() and self.el(css), timeout, f"{css} to show")

    def fill(self, css: str, value: str) -> None:
        # set the value as typing would, without typing each key (a long prompt stays fast)
        self.js(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input', {bubbles: true}));",
            css,
            value,
        )

    def set_params(self, **params: Any) -> None:
        """Sampling controls by request field (None empties one)."""
        for name, value in params.items():
            self.fill(f"#param-{name}", "" if value is None else str(value))

    # -- generation --------------------------------------------------------------------
    def generate(self, timeout: float = 60) -> str:
        """Click Generate, wait for the run to end; returns the finish reason shown."""
        before = int(self.js("return Number(document.querySelector('.gen').dataset.runs || 0)"))
        self.el("#generate").click()
        self.wait(
            lambda: int(self.js("return Number(document.querySelector('.gen').dataset.runs || 0)")) > before,
            timeout,
            "the generation to finish",
        )
        return self.wait(lambda: self.text("#stat-finish"), 5, "the finish reason")

    def completion_text(self) -> str:
        return self.js("return document.querySelector('#output .completion')?.textContent ?? ''")

    # -- evidence ----------------------------------------------------------------------
    def shot(self, name: str, doc_name: str | None = None, scroll_to: str | None = None) -> Path:
        """A screenshot under the test's directory (and in the docs' folder when asked),
        after scrolling the element ``scroll_to`` to the top of the window if given."""
        if scroll_to:
            self.js("document.querySelector(arguments[0]).scrollIntoView({block: 'start'})", scroll_to)
        path = self.out_dir / f"{name}.png"
        self.driver.save_screenshot(str(path))
        if doc_name and DOC_SHOTS:
            Path(DOC_SHOTS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(DOC_SHOTS) / f"{doc_name}.png")
        return path

    def expect_network_error(self, status: int) -> None:
        """A failed request with ``status`` is part of this test, not a page error."""
        self.allowed_network.append(f"status of {status}")

    def console_errors(self) -> list[dict[str, Any]]:
        self.console.extend(self.driver.get_log("browser"))
        errors = []
        for entry in self.console:
            if entry["level"] != "SEVERE":
                continue
            if entry.get("source") == "network" and any(a in entry["message"] for a in self.allowed_network):
                continue
            errors.append(entry)
        return errors

    def close(self) -> None:
        self.driver.quit()


def page_on(url: str, out_dir: Path, **kwargs: Any) -> Iterator[Page]:
    """A fixture's body: a Page on ``url`` that, after the test, saves a final screenshot
    and fails the test if the page logged an error."""
    page = Page(url, out_dir, **kwargs)
    try:
        yield page
        page.shot("final")
        errors = page.console_errors()
        assert not errors, f"the page logged errors: {errors}"
    finally:
        page.close()
