"""The HTML: one self-contained file (Plotly's JS inlined from the plotly package; no network, works from file://).

Sections, regressions first: regressions, verdicts (filterable by check, subject and environment), engine
versions (one chart per parity and routing statistic, and the cells whose verdict changed between versions),
framework metrics (verl's, slime's and NeMo-RL's mismatch metrics per engine pair and per trainer run over its steps),
benchmarks over time (one chart per metric, and a table).
"""

import html
import importlib.util
import json
from collections import Counter, defaultdict
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.report.charts import (
    BENCHMARK_METRICS,
    benchmark_traces,
    benchmark_value,
    busiest_shape,
    engine_traces,
    run_label,
)
from rlparity.report.frameworks import CHARTED, MORE, View, series_colors, traces
from rlparity.report.regressions import engine_version_text, reproduce_command
from rlparity.results import VERDICTS


def plotly_js() -> str:
    spec = importlib.util.find_spec("plotly")  # located, not imported: only its bundled JS is needed
    script = Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js" if spec else None
    if script is None or not script.exists():
        raise RlparityError("the dashboard's charts need plotly.min.js from the plotly package: "
                            "pip install 'rlparity[dashboard]'")
    return script.read_text()


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def table(headers, rows, attrs="") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(f"<tr{row_attrs}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
                   for row_attrs, cells in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def verdict_span(verdict: str, text: str | None = None) -> str:
    return f'<span class="{esc(verdict)}">{esc(text or verdict)}</span>'


def chart(chart_id: str, title: str, traces: list[dict], axis: str = "linear", note: str = "", *,
          from_zero: bool = True, height: int = 380, x_axis: dict | None = None) -> str:
    y_axis = {"type": axis, "rangemode": "tozero"} if axis == "linear" and from_zero else {"type": axis}
    note = html.escape(note).replace("\n", "<br>")  # a second line of the note, where one is given
    text = f"{html.escape(title)}<br><sub>{note}</sub>" if note else html.escape(title)
    # titles hang from the top, so the charts of a row line them up whatever the length of their notes
    layout = {"title": {"text": text, "y": 1, "yref": "container", "yanchor": "top", "pad": {"t": 20}},
              "yaxis": y_axis, "height": height, "margin": {"l": 60, "r": 10, "t": 64 + 14 * note.count("<br>")},
              "legend": {"font": {"size": 10}, "orientation": "h", "y": -0.2},
              "xaxis": x_axis or {"type": "category", "automargin": True}}
    data = json.dumps({"id": chart_id, "traces": traces, "layout": layout}).replace("</", "<\\/")
    return f'<div class="chart" id="{chart_id}"></div><script type="application/json" class="chart-data">' \
           f"{data}</script>"


def regressions_section(bench_changes, verdict_changes) -> str:
    bench = [c for c in bench_changes if c.regression]
    verdicts = [c for c in verdict_changes if c.regression]
    if not bench and not verdicts:
        return '<section id="regressions"><h2>Regressions</h2><p class="ok">No regressions.</p></section>'
    parts = [f'<section id="regressions"><h2 class="fail">Regressions ({len(bench) + len(verdicts)})</h2>']
    if verdicts:
        rows = [("", [esc(c.after["property"]), esc(c.after["subject"]), esc(c.after["case"]), esc(c.after["dtype"]),
                      esc(_where(c)), verdict_span(c.before["verdict"]) + " → " + verdict_span(c.after["verdict"]),
                      esc(c.after.get("reason")), f"<code>{esc(reproduce_command(c.after))}</code>"])
                for c in verdicts]
        parts.append("<h3>Verdicts that went from pass to fail</h3>" + table(
            ["property", "subject", "case", "dtype", "where", "verdict", "reason", "reproduce"], rows,
            ' id="verdict-regressions"'))
    if bench:
        parts.append("<h3>Benchmarks slower than their measured noise</h3>" + change_table(bench, "bench-regressions"))
    return "".join(parts) + "</section>"


def _where(change) -> str:
    if change.between_versions:
        return f"{change.where}: {_versions(change.before)} → {_versions(change.after)}"
    return f"{change.where}: run {change.before['run_id']} → {change.after['run_id']}"


def _versions(row) -> str:
    return engine_version_text(row)


def change_table(changes, table_id) -> str:
    rows = []
    for c in changes:
        noise = ("not measured (too few rounds)" if c.noise is None
                 else f"±{100 * c.noise / c.previous['median_s']:.2f} %")
        rows.append((' class="regression"' if c.regression else "", [
            esc(c.latest["backend"] or c.name), esc(c.latest["shape"]), esc(c.environment),
            esc(run_label(c.previous)), esc(run_label(c.latest)),
            f"{c.previous['median_s'] * 1e3:.3f} → {c.latest['median_s'] * 1e3:.3f}",
            f"{100 * c.change:+.2f} %", noise]))
    return table(["backend", "shape", "environment", "previous run", "latest run", "median ms",
                  "change", "noise (3σ of rounds)"], rows, f' id="{table_id}"')


def verdicts_section(records: list[dict]) -> str:
    if not records:
        return '<section id="verdicts"><h2>Verdicts</h2><p>No conformance records found.</p></section>'
    latest = {}
    for row in records:  # oldest first: a later run on the same environment supersedes the cell's verdict
        latest[(row["property"], row["subject"], row["case"], row["dtype"], row["shapes"], row["environment"])] = row
    environments = sorted({row["environment"] for row in latest.values()})
    counts = defaultdict(Counter)
    for row in latest.values():
        counts[(row["property"].split(".")[0], row["subject"])][(row["environment"], row["verdict"])] += 1
    rows = []
    for (check, subject), by_env in sorted(counts.items()):
        cells = []
        for env in environments:
            cells.append(" ".join(verdict_span(v, f"{by_env[(env, v)]} {v}") for v in VERDICTS if by_env[(env, v)])
                         or "–")
        rows.append((f' data-check="{esc(check)}" data-subject="{esc(subject)}"', [esc(check), esc(subject), *cells]))
    checks = sorted({check for check, _ in counts})
    subjects = sorted({subject for _, subject in counts})
    filters = "".join(_select(name, values) for name, values in
                      (("check", checks), ("subject", subjects), ("environment", environments)))
    failing = [row for row in latest.values() if row["verdict"] in ("fail", "error")]
    detail = table(["property", "subject", "case", "dtype", "verdict", "reason", "environment"],
                   [("", [esc(r["property"]), esc(r["subject"]), esc(r["case"]), esc(r["dtype"]),
                          verdict_span(r["verdict"]), esc(r["reason"]), esc(r["environment"])]) for r in failing]) \
        if failing else "<p>No failing cells.</p>"
    return (f'<section id="verdicts"><h2>Verdicts</h2><div class="filters">{filters}'
            f'<span id="verdict-count"></span></div>'
            + table(["check", "subject", *environments], rows, ' id="verdict-grid"')
            + f"<details><summary>Failing cells ({len(failing)})</summary>{detail}</details></section>")


def _select(name: str, values) -> str:
    options = "".join(f'<option value="{i if name == "environment" else esc(v)}">{esc(v)}</option>'
                      for i, v in enumerate(values))
    return f'<label>{name} <select id="filter-{name}"><option value="">all</option>{options}</select></label>'


def engines_section(statistics: dict, version_changes) -> str:
    parts = ['<section id="engines"><h2>Engine versions</h2>']
    if not statistics:
        parts.append("<p>No parity or routing records that name an engine version.</p>")
    charts = []
    for key, (title, axis, points) in statistics.items():
        zeros = sum(1 for by_version in points.values() for v in by_version.values() if v == 0)
        note = f"{zeros} points equal to 0 are not drawn on the log axis" if axis == "log" and zeros else ""
        charts.append(chart(f"engine-{key}", title, engine_traces(points, axis), axis, note))
    parts.append(f'<div class="charts">{"".join(charts)}</div>')
    rows = [("", [esc(c.after["property"]), esc(c.after["subject"]), esc(c.after["case"]), esc(c.after["dtype"]),
                  esc(c.where), f"{esc(_versions(c.before))}: {verdict_span(c.before['verdict'])}",
                  f"{esc(_versions(c.after))}: {verdict_span(c.after['verdict'])}"]) for c in version_changes]
    parts.append("<h3>Cells whose verdict changed between engine versions</h3>" + (table(
        ["property", "subject", "case", "dtype", "device", "older", "newer"], rows, ' id="version-changes"')
        if rows else "<p>None: every cell has the same verdict under every engine version recorded.</p>"))
    return "".join(parts) + "</section>"


FRAMEWORK_VIEWS = {"pairs": ("Per engine pair, run by run (each run named by the engine versions it ran)",
                             "No parity records with framework metrics."),
                   "steps": ("Trainer runs over their steps: a rollout engine whose weight sync lags shows as a line "
                             "rising from the first step's level", "No trainer step records with framework metrics.")}


CSS_DASHES = {"solid": "solid", "dash": "dashed", "dot": "dotted"}  # Plotly's line dashes, for the legend's keys


def framework_charts(view: View, metrics) -> str:
    if view.name == "steps":  # steps are numbers; at most about ten ticks
        x_axis = {"type": "linear", "title": {"text": "step"}, "dtick": max(1, -(-len(view.x_order) // 10))}
    else:
        x_axis = {"type": "category", "automargin": True, "categoryorder": "array", "categoryarray": view.x_order,
                  "tickvals": view.x_order, "ticktext": [view.x_labels[x] for x in view.x_order]}
    charts = []
    for metric in metrics:
        found, dropped = traces(view, metric)
        if not found:
            continue
        note = f"{metric.framework} · {metric.meaning}" + (f"\n{dropped} points ≤ 0 not drawn on the log axis"
                                                           if dropped else "")
        charts.append(f'<div data-metric="{esc(metric.name)}">' + chart(
            f"fw-{view.name}-{metric.name.replace('/', '-')}", metric.title, found, metric.axis, note,
            from_zero=False, height=300, x_axis=x_axis) + "</div>")
    return "".join(charts)


def frameworks_section(views: list[View]) -> str:
    parts = ['<section id="frameworks"><h2>Framework metrics</h2><p>The train–rollout mismatch under the names verl, '
             "slime and NeMo-RL log it (<code>rlparity.mismatch_metrics</code>), of the same log-probs the checks "
             "compare: on the engine pairs of the parity checks, and on each trainer step's first training pass "
             "against its rollout. Hover a line for its values.</p>"]
    for view in views:
        title, empty = FRAMEWORK_VIEWS[view.name]
        parts.append(f"<h3>{esc(title)}</h3>")
        headline = framework_charts(view, CHARTED)
        if not headline:
            parts.append(f"<p>{esc(empty)}</p>")
            continue
        keys = "".join(f'<span><i style="border-top:3px {CSS_DASHES[dash]} {color}"></i>{esc(series)}</span>'
                       for series, color, dash in series_colors(view))
        parts.append(f'<div class="legend" id="fw-{view.name}-legend">{keys}</div>'
                     f'<div class="charts compact">{headline}</div>')
        if more := framework_charts(view, MORE):
            parts.append(f'<details class="more"><summary>More verl metrics: {", ".join(m.name for m in MORE)}'
                         f'</summary><div class="charts compact">{more}</div></details>')
    return "".join(parts) + "</section>"


def benchmarks_section(rows: list[dict], changes) -> str:
    if not rows:
        return '<section id="benchmarks"><h2>Benchmarks over time</h2><p>No benchmark files found.</p></section>'
    shown = busiest_shape(rows)
    shapes = "".join(f'<option{" selected" if shape == shown else ""}>{esc(shape)}</option>'
                     for shape in sorted({row["shape"] for row in rows}))
    parts = ['<section id="benchmarks"><h2>Benchmarks over time</h2><div class="filters"><label>shape '
             f'<select id="filter-shape"><option value="">all</option>{shapes}</select></label> one line per backend '
             'and device, one point per run</div>']
    charts = [chart(f"bench-{metric}", title, traces, "log" if metric == "median_ms" else "linear")
              for metric, title in BENCHMARK_METRICS.items() if (traces := benchmark_traces(rows, metric, shown))]
    parts.append(f'<div class="charts">{"".join(charts)}</div>')
    if changes:
        parts.append("<h3>Latest run against the previous one</h3>" + change_table(changes, "bench-changes"))
    table_rows = []
    for row in sorted(rows, key=lambda r: (r["backend"] or r["name"], r["shape"], r["environment"], r["time"])):
        values = [benchmark_value(row, metric) for metric in BENCHMARK_METRICS]
        table_rows.append(("", [esc(row["backend"] or row["name"]), esc(row["shape"]), esc(row["environment"]),
                                esc(run_label(row)), *(_fmt(v) for v in values), esc(row["rounds"]),
                                esc(row["source"])]))
    parts.append("<h3>Every run</h3>" + table(
        ["backend", "shape", "environment", "run", "median ms", "TFLOP/s", "% of peak", "memory GiB", "rounds",
         "file"], table_rows, ' id="bench-table"'))
    return "".join(parts) + "</section>"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1600px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.85em;
vertical-align:top}th{background:#f3f3f3;position:sticky;top:0}.pass,.ok{color:#176b2c}
.fail,.error{color:#b00020;font-weight:600}.skip{color:#777}tr.regression{background:#fde8eb}
.filters label{margin-right:1em}.filters select{max-width:22em}
.chart{min-height:380px;min-width:0}.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(600px,1fr));gap:1em}
code{font-size:.85em}nav a{margin-right:1em}
.charts.compact{grid-template-columns:repeat(auto-fit,minmax(320px,1fr))}.compact .chart{min-height:300px}
.legend{margin:.5em 0;font-size:.85em;line-height:1.8}.legend span{margin-right:1.5em;white-space:nowrap}
.legend i{display:inline-block;width:2em;vertical-align:middle;margin-right:.4em}details.more{margin:.5em 0}"""

SCRIPT = """
for (const holder of document.querySelectorAll('script.chart-data')) {
  const spec = JSON.parse(holder.textContent);
  Plotly.newPlot(spec.id, spec.traces, spec.layout, {responsive: true, displayModeBar: false});
}
function applyFilters() {
  const check = document.getElementById('filter-check').value;
  const subject = document.getElementById('filter-subject').value;
  const env = document.getElementById('filter-environment').value;
  const grid = document.getElementById('verdict-grid');
  let shown = 0;
  for (const row of grid.tBodies[0].rows) {
    const visible = (!check || row.dataset.check === check) && (!subject || row.dataset.subject === subject);
    row.style.display = visible ? '' : 'none';
    if (visible) shown++;
  }
  for (const row of grid.rows) {
    for (let i = 2; i < row.cells.length; i++) {
      row.cells[i].style.display = (!env || String(i - 2) === env) ? '' : 'none';
    }
  }
  document.getElementById('verdict-count').textContent = shown + ' of ' + grid.tBodies[0].rows.length + ' rows';
}
function showShape() {
  const shape = document.getElementById('filter-shape').value;
  for (const div of document.querySelectorAll('#benchmarks .chart')) {
    Plotly.restyle(div, {visible: div.data.map(trace => !shape || trace.meta === shape)});
  }
}
// Where a browser lays a closed <details> out as display:none (Chromium keeps its layout), its charts were drawn
// without a width: redraw them when unfolded.
for (const more of document.querySelectorAll('details.more')) {
  more.addEventListener('toggle', () => more.querySelectorAll('.chart').forEach(div => Plotly.Plots.resize(div)));
}
if (document.getElementById('filter-shape')) {
  document.getElementById('filter-shape').addEventListener('change', showShape);
}
if (document.getElementById('verdict-grid')) {
  for (const name of ['check', 'subject', 'environment']) {
    document.getElementById('filter-' + name).addEventListener('change', applyFilters);
  }
  applyFilters();
}
"""


def render(summary: str, sections: list[str]) -> str:
    nav = "".join(f'<a href="#{anchor}">{anchor}</a>' for anchor in ("regressions", "verdicts", "engines",
                                                                       "frameworks", "benchmarks"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>rlparity dashboard</title>"
            f"<style>{STYLE}</style><script>{plotly_js()}</script></head><body><h1>rlparity</h1>"
            f"<nav>{nav}</nav><p>{summary}</p>{''.join(sections)}<script>{SCRIPT}</script></body></html>")
