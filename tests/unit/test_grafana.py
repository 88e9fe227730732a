"""docs/grafana/stampflow.json names only metrics the code defines, and shows every one.

The metric families are read from the source (every ``Counter``/``Gauge``/``Histogram``/
``Summary`` call with a literal name under src/), so a renamed or new metric breaks this test
until the dashboard follows.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "stampflow.json"
KINDS = {"Counter", "Gauge", "Histogram", "Summary"}
# Families deliberately not on the dashboard, with the reason. None today.
LEFT_OUT: dict[str, str] = {}
# Series names each kind exposes (prometheus_client's text format).
SUFFIXES = {"Counter": ("", "_created"), "Gauge": ("",),
            "Histogram": ("_bucket", "_sum", "_count", "_created"),
            "Summary": ("", "_sum", "_count", "_created")}


def defined_families() -> dict[str, str]:
    """Metric name -> kind, for every metric defined under src/ (links into src/ skipped)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "src").rglob("*.py")):
        if any(part.is_symlink() for part in [path, *path.parents] if part != ROOT):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in KINDS and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found[node.args[0].value] = node.func.id
    return found


def series_names(families: dict[str, str]) -> dict[str, str]:
    """Every series name a scrape can carry -> its family."""
    return {name + suffix: name for name, kind in families.items() for suffix in SUFFIXES[kind]}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows hold their panels
    return out


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


# A selector or a range: a name followed by { or [ (functions are followed by "(").
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]")
STAMPFLOW_NAME = re.compile(r"\bstampflow_[a-z0-9_]+\b")


def names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    return set(SELECTOR.findall(without_labels)) | set(STAMPFLOW_NAME.findall(without_labels))


def test_the_code_defines_the_metrics_this_test_knows_of() -> None:
    families = defined_families()
    assert "stampflow_workflows_total" in families
    assert "stampflow_inference_jobs_total" in families  # outside nodes/metrics.py too
    assert len(families) >= 12


def test_the_dashboard_is_a_grafana_model_with_a_prometheus_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_every_expression_names_only_defined_metrics() -> None:
    known = series_names(defined_families())
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = expressions(dashboard)
    assert exprs
    for expr in exprs:
        names = names_in(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - set(known)
        assert not unknown, f"{expr!r} names metrics the code does not define: {unknown}"


def test_every_metric_family_is_on_the_dashboard() -> None:
    families = defined_families()
    known = series_names(families)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    shown = {known[name] for expr in expressions(dashboard) for name in names_in(expr)
             if name in known}
    missing = set(families) - shown - set(LEFT_OUT)
    assert not missing, f"metric families on no panel: {sorted(missing)} (add a panel, or " \
        "list them in LEFT_OUT with the reason)"
    assert not set(LEFT_OUT) - set(families), "LEFT_OUT names a metric that no longer exists"


def test_the_check_catches_a_renamed_metric() -> None:
    known = set(series_names(defined_families()))
    assert names_in('rate(stampflow_workflow_total{kind="stamp"}[5m])') - known
    assert names_in("sum(stampflow_inference_job_in_flight)") - known
    assert names_in("rate(process_cpu_seconds_total[5m])") - known
