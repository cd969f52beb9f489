"""Debian's chromium, headless, driven by Selenium through Debian's chromedriver (not a test module).

Nothing is downloaded: the driver is given by path, so Selenium Manager never runs, and chromium is
started with its background connections off (this machine's closed network refuses them, and a
test must not depend on them). Each browser gets a fresh profile under the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sshd import skip_or_fail

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 120  # generous: two shared cores, and a job transcribes while the page waits
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000")


def chromium(profile: Path):
    """A headless chromium (a selenium WebDriver) with a fresh profile in `profile`; quit() it when done.
    Skips (fails under CI=true) without chromium, chromedriver or selenium."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            skip_or_fail(f"needs {path} (apt-get install {package})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("needs selenium (pip install -e '.[test]')")
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager, were it ever asked, stays offline
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir(parents=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / f"{profile.name}-driver.log"))
    return webdriver.Chrome(options=options, service=service)


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    """WebDriverWait until `condition(driver)` is truthy (returned); fails naming `what` and the
    page's console messages."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        console = "\n".join(entry["message"] for entry in driver.get_log("browser"))
        summary = driver.execute_script("return document.getElementById('summary')?.textContent")
        raise AssertionError(f"the page never showed {what} within {timeout} s; summary: {summary!r}; "
                             f"console:\n{console}") from None


def console_errors(driver) -> list[str]:
    """The page's console messages at SEVERE level (a script error, a resource the page's policy
    refused), less the daemon's own HTTP errors (chromium logs every 4xx answer; tests check those)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
            and "the server responded with a status of" not in entry["message"]]
