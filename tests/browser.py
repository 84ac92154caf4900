"""Headless Chromium through Selenium, on Debian's `chromium` and `chromium-driver`
(`.ci/run` installs them; a browser that an installer downloads does not run here)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Ray's dashboard keeps the token in this cookie once its dialog (or POST /api/authenticate)
# accepted it (ray/_private/authentication/authentication_constants.py).
RAY_AUTH_COOKIE = "ray-authentication-token"


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[object]:
    from selenium import webdriver

    browser, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_bin, ("the browser test needs Debian's chromium and "
                                    "chromium-driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    # An explicit driver: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_bin))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message=f"waited {timeout:.0f} s for {what}")


def check_report_page(driver, index: Path, trials: int, shots: Path) -> None:
    """index.html: the answer plots drawn, the trials table, and the page's trial count."""
    from selenium.webdriver.common.by import By

    driver.get(index.resolve().as_uri())
    for plot in ("answer_lr", "answer_grid"):
        image = driver.find_element(By.ID, plot)
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                     image) > 100, f"{plot} is not drawn"
    assert int(driver.find_element(By.ID, "trial-count").text) == trials
    rows = driver.find_elements(By.CSS_SELECTOR, "#trials tr")
    assert len(rows) == trials + 1                      # the header and one row per trial
    assert driver.find_element(By.ID, "best-config").is_displayed()
    shots.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shots / "report.png"))
