"""The dashboard in a real browser (Debian's chromium, headless, through Selenium and chromium-driver): no console
errors, the charts hold the synthetic history's series and points (the frameworks' mismatch metrics among them, the
folded-away ones drawn full width once unfolded), the filters change what is shown, and a screenshot is written to
$RLPARITY_ARTIFACTS (default build/artifacts) for CI to keep."""

import os
import shutil
from pathlib import Path

import pytest

from rlparity.report.dashboard import build
from tests.synthetic_history import (
    ATTENTION_SHAPE,
    BACKENDS,
    IN_SYNC,
    LAGGING,
    PLANTED_SLOWDOWN,
    TRAINER_STEPS,
    VERSIONS,
    trainer_step_metrics,
    write_history_inputs,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_LOAD_SECONDS = 60
ARTIFACTS = Path(os.environ.get("RLPARITY_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "artifacts"))

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="no chromium and chromium-driver: apt-get install chromium chromium-driver"),
              pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(PAGE_LOAD_SECONDS)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("history")
    results, benchmarks = write_history_inputs(root)
    with pytest.warns(UserWarning, match="torn last line"):
        dashboard = build([results], [benchmarks], root / "site" / "index.html", commit="c0ffee")
    browser.get(dashboard.path.as_uri())
    return browser


def chart(browser, chart_id) -> list[dict]:
    return browser.execute_script(
        "return document.getElementById(arguments[0]).data.map(t => ({name: t.name, x: t.x, y: t.y, "
        "visible: t.visible, meta: t.meta}))", chart_id)


def visible_rows(browser, table_id) -> int:
    return browser.execute_script(
        "return [...document.getElementById(arguments[0]).tBodies[0].rows].filter(r => r.offsetParent).length",
        table_id)


def test_the_page_loads_without_console_errors(page):
    errors = [entry for entry in page.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    assert page.execute_script("return typeof Plotly") == "object"


def test_the_charts_hold_the_expected_series_and_points(page):
    times = [trace for trace in chart(page, "bench-median_ms") if trace["meta"] == ATTENTION_SHAPE]
    assert sorted(trace["name"].split(" · ")[0] for trace in times) == sorted(BACKENDS)
    assert all(len(trace["x"]) == len(trace["y"]) == 2 for trace in times)  # two runs each
    triton = next(trace for trace in times if trace["name"].startswith("triton"))
    assert triton["y"][1] / triton["y"][0] == pytest.approx(PLANTED_SLOWDOWN)

    flips = chart(page, "engine-flip_rate")
    assert [trace["x"] for trace in flips] == [[f"vllm {v}" for v in VERSIONS]]
    assert flips[0]["y"] == pytest.approx([0.02, 0.03])
    dlogp = chart(page, "engine-dlogp_max")
    assert len(dlogp) == 2 and all(len(trace["x"]) == 2 for trace in dlogp)  # two pairs, one point per version


def test_the_framework_metrics_are_drawn_under_their_names(page):
    drift = chart(page, "fw-steps-train-train_rollout_logprob_abs_diff")
    assert sorted(trace["name"] for trace in drift) == sorted(f"{s} · trainer/drift" for s in (IN_SYNC, LAGGING))
    for trace in drift:
        subject = trace["name"].split(" · ")[0]
        assert trace["x"] == list(range(TRAINER_STEPS))
        assert trace["y"] == pytest.approx([trainer_step_metrics(subject, step)["train/train_rollout_logprob_abs_diff"]
                                            for step in range(TRAINER_STEPS)], rel=1e-15)
    # the title as drawn: Plotly joins its lines (title, framework · meaning) with a zero-width space
    title = "return document.getElementById(arguments[0]).querySelector('.gtitle').textContent.split('\u200b')"
    assert page.execute_script(title, "fw-pairs-rollout_corr-sequence-rollout_is_eff_sample_size")[:2] == [
        "rollout_corr/rollout_is_eff_sample_size", "verl · sequence level (verl's default)"]
    assert page.execute_script(title, "fw-steps-train-token_mult_prob_error")[0] == "train/token_mult_prob_error"
    assert len(chart(page, "fw-pairs-training-rollout_probs_diff_max")) == 2  # the two engine pairs

    width = "return document.getElementById(arguments[0]).querySelector('.main-svg').getBoundingClientRect().width"
    folded = "fw-steps-rollout_corr-kl"
    page.execute_script("document.getElementById(arguments[0]).closest('details').open = true", folded)
    page.execute_script("return new Promise(resolve => requestAnimationFrame(resolve))")
    beside = page.execute_script(width, "fw-steps-rollout_corr-k3_kl")
    assert page.execute_script(width, folded) == pytest.approx(beside, abs=2)  # resized to its column when unfolded
    page.execute_script("document.getElementById(arguments[0]).closest('details').open = false", folded)


def test_the_verdict_filters_change_what_is_shown(page):
    from selenium.webdriver.support.ui import Select

    all_rows = visible_rows(page, "verdict-grid")
    Select(page.find_element("id", "filter-check")).select_by_visible_text("routing")
    assert visible_rows(page, "verdict-grid") == 1 < all_rows
    assert page.find_element("id", "verdict-count").text == f"1 of {all_rows} rows"
    Select(page.find_element("id", "filter-check")).select_by_visible_text("all")
    assert visible_rows(page, "verdict-grid") == all_rows

    columns = "return [...document.getElementById('verdict-grid').rows[0].cells].filter(c => c.offsetParent).length"
    before = page.execute_script(columns)
    Select(page.find_element("id", "filter-environment")).select_by_index(1)
    assert page.execute_script(columns) == 3 < before  # check, subject and the one environment
    Select(page.find_element("id", "filter-environment")).select_by_index(0)


def test_the_shape_filter_shows_the_traces_of_that_shape(page):
    from selenium.webdriver.support.ui import Select

    def shown():
        traces = chart(page, "bench-tflops")
        return sorted(trace["name"].split(" · ")[0] for trace in traces if trace["visible"] is True)

    assert shown() == sorted(BACKENDS)  # the shape with the most points, first
    Select(page.find_element("id", "filter-shape")).select_by_visible_text("8192² bf16")
    assert shown() == ["matmul_peak"]
    Select(page.find_element("id", "filter-shape")).select_by_visible_text("all")
    assert shown() == sorted([*BACKENDS, "matmul_peak"])
    Select(page.find_element("id", "filter-shape")).select_by_visible_text(ATTENTION_SHAPE)


def test_a_screenshot_is_written(page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "dashboard.png"
    page.set_window_size(1400, page.execute_script("return document.body.scrollHeight") + 50)
    page.execute_script("window.scrollTo(0, 0)")
    assert page.save_screenshot(str(path))
    assert path.stat().st_size > 20_000  # a blank page is a few kilobytes
