"""The Grafana dashboards' queries, outside Grafana: variable expansion and a matplotlib render.

Grafana is not installable on the development machine (no Debian package, no Docker engine),
so ``apmae dashboards render`` draws each dashboard's panels from the same PromQL, queried
from a real Prometheus over a time range, one subplot per panel, laid out as in the JSON.
The end-to-end test uses it on the demo's live metrics; docs/dashboards/*.png are its output.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from datetime import UTC
from pathlib import Path

BOARDS = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"


def expand(expr: str, variables: dict[str, str] | None = None, rate_interval: str = "1m") -> str:
    """Grafana's substitution for ``$var`` (All = ``.*``) and ``$__rate_interval``."""
    out = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$(\w+)", lambda m: (variables or {}).get(m.group(1), ".*"), out)


def variable_query(definition: str) -> tuple[str, str]:
    """``label_values(metric{sel}, label)`` -> (series selector, label)."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    if not m:
        raise ValueError(f"unsupported variable query {definition!r}")
    return m.group(1), m.group(2)


def _get(url: str, path: str, params: dict[str, str] | list[tuple[str, str]]) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?" + urllib.parse.urlencode(params), timeout=30) as r:
        body = json.load(r)
    if body["status"] != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def variable_values(prom_url: str, var: dict, variables: dict[str, str] | None = None) -> list[str]:
    selector, label = variable_query(var["definition"])
    return _get(prom_url, f"label/{label}/values", [("match[]", expand(selector, variables))])


def load(name: str | Path) -> dict:
    path = Path(name) if Path(name).suffix == ".json" else BOARDS / f"{name}.json"
    return json.loads(path.read_text())


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def render(board: dict, prom_url: str, out: Path, start: float, end: float, step: float | None = None) -> dict:
    """Draw ``board`` from ``prom_url`` over [start, end] into ``out`` (PNG); returns the
    number of series drawn per panel title."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    step = step or max(1.0, (end - start) / 300)
    rate_interval = f"{max(int(4 * step), 60)}s"
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) / 8
    fig = plt.figure(figsize=(16, 3.2 * rows))
    fig.suptitle(f"{board['title']}  (rendered from Prometheus with matplotlib: Grafana is not installable here)",
                 fontsize=11)
    gs = fig.add_gridspec(int(round(rows)), 24, hspace=0.55, wspace=0.9)
    drawn: dict[str, int] = {}
    for p in panels:
        g = p["gridPos"]
        r0 = int(g["y"] // 8)
        ax = fig.add_subplot(gs[r0: r0 + max(1, int(g["h"] // 8)), g["x"]: g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=9)
        n = 0
        for t in p["targets"]:
            expr = expand(t["expr"], rate_interval=rate_interval)
            if p["type"] in ("stat", "table"):
                res = _get(prom_url, "query", {"query": expr, "time": str(end)})["result"]
                names = [legend(t.get("legendFormat", ""), s["metric"]) for s in res]
                vals = [float(s["value"][1]) for s in res]
                ax.barh(names, vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
                ax.tick_params(labelsize=7)
                n += len(res)
                continue
            res = _get(prom_url, "query_range", {"query": expr, "start": str(start), "end": str(end),
                                                 "step": str(step)})["result"]
            for s in res:
                xs = [datetime.fromtimestamp(float(v[0]), tz=UTC) for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                ax.plot(xs, ys, lw=1.2, label=legend(t.get("legendFormat", ""), s["metric"])[:40])
                n += 1
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
            ax.tick_params(labelsize=7)
        if p["type"] not in ("stat", "table") and n:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
        if not n:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if unit and p["type"] == "timeseries":
            ax.set_ylabel(unit, fontsize=7)
        drawn[p["title"]] = n
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return drawn


def render_all(prom_url: str, out_dir: Path, minutes: float = 15.0) -> dict[str, dict]:
    end = time.time()
    return {b.stem: render(load(b), prom_url, out_dir / f"{b.stem}.png", end - minutes * 60, end)
            for b in sorted(BOARDS.glob("*.json"))}
