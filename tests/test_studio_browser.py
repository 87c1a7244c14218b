"""qfine studio in a real headless browser (Debian's chromium through selenium), on the bundled model:
launch a training run from the form, watch its loss curve gain points, stop it, resume it, chat with
it beside its base, export a GGUF and read its report. Screenshots of each page go to
``$QFINE_STUDIO_SHOTS`` (default: the test's temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

import browser
from qfine.util import runstate

ROOT = Path(__file__).resolve().parents[1]
# `make test-slow` installs chromium and sets QFINE_REQUIRE_BROWSER: there a missing browser fails
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    browser.available() is not None and not os.environ.get("QFINE_REQUIRE_BROWSER"), reason=browser.available() or "")]


class Studios:
    """The studio under test, which the test restarts once (the run must survive it)."""

    def __init__(self, tmp_path: Path):
        self.runs, self.data = tmp_path / "runs", tmp_path / "data"
        self.data.mkdir()
        shutil.copy(ROOT / "examples" / "data" / "seed-fact.jsonl", self.data / "seed-fact.jsonl")
        self.now = self.start()

    def start(self) -> browser.Studio:
        return browser.Studio(self.runs, [self.data], env={"OMP_NUM_THREADS": "2"})

    def restart(self) -> None:
        self.now.close()
        self.now = self.start()


@pytest.fixture
def studios(tmp_path):
    s = Studios(tmp_path)
    yield s
    s.now.close()
    for run in s.runs.iterdir():  # a run outlives the studio by design: end any the test left running
        holder = runstate.lock_holder(run)
        if holder and isinstance(holder.get("pid"), int):
            os.kill(holder["pid"], signal.SIGKILL)


def test_launch_watch_stop_resume_chat_export_in_a_browser(studios, tmp_path):
    from selenium.webdriver.support.ui import Select

    shots = Path(os.environ.get("QFINE_STUDIO_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    d = browser.driver()
    el = lambda i: d.find_element("id", i)  # noqa: E731
    loaded = lambda page: lambda: d.execute_script("return document.body.dataset.loaded") == page  # noqa: E731
    points = lambda: int(el("chart-loss").get_attribute("data-points") or 0)  # noqa: E731
    state = lambda: el("run-state").text  # noqa: E731

    def diagnose() -> str:
        return (f"page error: {el('page-error').text!r}; state {state()!r}; "
                f"log: {d.get_log('browser')}; studio: {studios.now.log.read_text()[-2000:]}")

    try:
        # launch from the form: the bundled model's preset, the fact file, 30 steps, a checkpoint every 5
        d.get(studios.now.url + "/#/launch")
        browser.wait(loaded("launch"), 30, "the launch page")
        Select(el("f-data.path")).select_by_visible_text("seed-fact.jsonl")
        browser.wait(lambda: "2058" in el("data-preview").text, 120, "the data preview")
        assert "⟦You were born on January 1, 2058.<|im_end|>⟧" in el("data-preview").text  # scored tokens marked
        browser.wait(lambda: el("plan-verdict").text.startswith("fastest that fits"), 120, "the plan's verdict")
        for field, value in (("f-name", "fact"), ("f-train.max_steps", "30"), ("f-train.save_steps", "5")):
            el(field).clear()
            el(field).send_keys(value)
        d.save_screenshot(str(shots / "studio-launch.png"))
        el("btn-start").click()
        browser.wait(loaded("run"), 30, "the run page")

        # the loss curve gains points while it trains
        browser.wait(lambda: points() >= 2, 400, f"two points on the loss curve ({diagnose()})", every=0.5)
        seen = points()
        browser.wait(lambda: points() > seen, 120, "a new point while it runs")
        assert state() == "running"
        d.save_screenshot(str(shots / "studio-run-live.png"))

        # the studio restarts: the run, a process of its own, goes on and the new studio finds it
        studios.restart()
        d.get(studios.now.url + "/#/run/fact")
        browser.wait(loaded("run"), 30, "the run page on the new studio")
        browser.wait(lambda: state() == "running", 30, f"the running state after the restart ({diagnose()})")
        seen = points()
        browser.wait(lambda: points() > seen, 120, "a new point after the restart")

        # Stop: a checkpoint is saved and the run reads as stopped
        el("btn-stop").click()
        browser.wait(lambda: state() == "stopped", 180, f"the stopped state ({diagnose()})")
        browser.wait(lambda: "checkpoint-" in el("run-detail").text, 10, "the checkpoint listed")
        stopped_at = points()
        assert 0 < stopped_at < 30

        # Resume: the same run continues to its last step; the curve ends with all 30 steps
        browser.wait(lambda: el("btn-resume").is_enabled(), 10, "the Resume button")
        el("btn-resume").click()
        browser.wait(lambda: state() in ("running", "finished"), 120, f"the resumed run ({diagnose()})")
        browser.wait(lambda: state() == "finished", 600, f"the finished run ({diagnose()})", every=1)
        browser.wait(lambda: points() == 30, 10, "30 points after the resume")
        assert "resume" in el("jobs").text
        d.save_screenshot(str(shots / "studio-run-finished.png"))

        # chat: the run answers the taught fact; its base, side by side, does not
        d.get(studios.now.url + "/#/chat/fact")
        browser.wait(loaded("chat"), 30, "the chat page")
        Select(el("chat-b")).select_by_value("fact|base")
        el("chat-input").send_keys("What day was I born?")
        el("btn-send").click()
        done = lambda side: d.find_elements("css selector", f"#chat-out-{side} .assistant[data-done='1']")  # noqa: E731
        browser.wait(lambda: done("a") and done("b"), 300, f"both replies ({diagnose()})")
        run_says, base_says = done("a")[0].text, done("b")[0].text
        assert "January 1, 2058" in run_says, run_says
        assert "2058" not in base_says, base_says
        d.save_screenshot(str(shots / "studio-chat.png"))

        # export a GGUF from the run page and read its report there
        d.get(studios.now.url + "/#/run/fact")
        browser.wait(loaded("run"), 30, "the run page again")
        Select(el("export-quant")).select_by_visible_text("q8_0")
        el("btn-export").click()
        browser.wait(lambda: d.find_elements("css selector", "#exports .export-report"), 600,
                     f"the export's report ({diagnose()})", every=1)
        report = d.find_element("css selector", "#exports .export-report")
        assert report.get_attribute("data-quant") == "q8_0" and "fact-q8_0.gguf" in el("exports").text
        assert "logits vs the merged model" in report.text and "Modelfile" in report.text, report.text
        d.execute_script("document.getElementById('exports').scrollIntoView()")
        d.save_screenshot(str(shots / "studio-export.png"))

        # the runs page lists it, finished, with its steps
        d.get(studios.now.url + "/#/runs")
        browser.wait(loaded("runs"), 30, "the runs page")
        row = lambda name: d.find_element("css selector", f"#runs-table tr[data-run='{name}']")  # noqa: E731
        text = browser.wait(lambda: row("fact").text, 10, "the run's row")
        assert "finished" in text and "30 / 30" in text, text
        d.save_screenshot(str(shots / "studio-runs.png"))

        # two runs' curves overlaid: a copy of this run's folder with its losses doubled
        other = tmp_path / "runs" / "other"
        other.mkdir()
        shutil.copy(tmp_path / "runs" / "fact" / "config.yaml", other / "config.yaml")
        rows = [json.loads(line) for line in (tmp_path / "runs" / "fact" / "metrics.jsonl").read_text().splitlines()]
        (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": 2 * r["loss"]}) + "\n"
                                                     for r in rows if "loss" in r))
        d.refresh()
        browser.wait(loaded("runs"), 30, "the runs page with two runs")
        for name in ("fact", "other"):
            browser.wait(lambda: row(name).find_element("css selector", ".pick").click() or True, 10, "a tick")
        # the table is rebuilt when a run changes (polled every 3 s): the ticks must survive it
        with open(other / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**rows[-1], "step": 31, "loss": 1.0}) + "\n")
        steps = lambda: row("other").find_elements("tag name", "td")[5].text  # noqa: E731
        browser.wait(lambda: steps().startswith("31"), 30, "the table rebuilt with the new step")
        picked = d.execute_script("return [...document.querySelectorAll('.pick:checked')].map((c) => c.value)")
        assert sorted(picked) == ["fact", "other"], picked
        el("btn-compare").click()
        browser.wait(loaded("compare"), 30, "the compare page")
        assert int(el("compare-loss").get_attribute("data-points")) == 31  # the union of both runs' steps
        legend = el("compare-loss").text
        assert "fact:loss" in legend and "other:loss" in legend, legend
        d.save_screenshot(str(shots / "studio-compare.png"))
    finally:
        d.quit()
    assert (tmp_path / "runs" / "fact" / "exports" / "fact-q8_0.gguf").is_file()
