"""A real headless browser (Debian's chromium + chromium-driver, driven by selenium) and a studio
process for it, shared by the studio's browser tests and ``bench/studio_bench.py``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} is missing: make browser (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is missing: pip install -e '.[dev]'"
    return None


def driver(width: int = 1400, height: int = 1000):
    """Headless chromium with the flags this offline machine needs (no background network, no sandbox as root)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class Studio:
    """``qfine studio`` as a process on a free port; ``url`` once it printed its address."""

    def __init__(self, runs: Path, data: list[Path], host: str = "127.0.0.1", env: dict | None = None,
                 extra: list[str] = ()):
        self.log = Path(runs).parent / f"studio-{os.getpid()}-{time.time_ns()}.log"
        argv = [sys.executable, "-m", "qfine", "studio", "--runs", str(runs), "--host", host, "--port", "0",
                *[a for d in data for a in ("--data", str(d))], *extra]
        self.out = self.log.open("w")
        self.process = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 60) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            m = re.search(r"(http://\S+?:\d+)/", self.log.read_text())
            if m:
                return m.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"qfine studio exited {self.process.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"qfine studio printed no address in {timeout} s:\n{self.log.read_text()}")

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.out.close()


def wait(predicate, timeout: float, what: str, every: float = 0.2):
    """Poll ``predicate`` until it returns something true; its value, or AssertionError naming ``what``."""
    t0 = time.time()
    last = None
    while time.time() - t0 < timeout:
        try:
            last = predicate()
        except Exception as e:  # noqa: BLE001 - an element not there yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s for {what}; last: {last!r}")
