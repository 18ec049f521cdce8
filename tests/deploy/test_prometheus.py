"""The Prometheus rules, their unit tests and the scrape config, checked by
promtool; the metric names the rules read, checked against what the scheduler
and workers export; and every Grafana panel query, checked to read recording
rules only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from scheduler.metrics import SchedulerMetrics
from workers.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "avatarfarm.json"

_RECORD = re.compile(r"^\s*-\s*record:\s*(\S+)\s*$", re.M)
# A raw metric is an avatarfarm_ name that is not part of a recorded level:name:op.
_RAW = re.compile(r"(?<![\w:])avatarfarm_\w+(?![\w:])")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        why = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("AVATARFARM_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return found


def promtool(*args: str | Path) -> str:
    done = subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def recorded_names() -> set[str]:
    return set(_RECORD.findall(RULES.read_text()))


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every query, rows' nested panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield p["title"], t["expr"]
            yield from walk(p.get("panels", []))
    yield from walk(dashboard["panels"])


def series_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers that are not functions,
    keywords, label names or durations."""
    bare = _GROUPING.sub(" ", re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", _STRING.sub('""', expr)))
    return {m.group() for m in _IDENT.finditer(bare)
            if m.group() not in _KEYWORDS and not bare[m.end():].lstrip().startswith("(")}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose, labelled children not yet created
    included (a labelled metric exposes nothing until its first child)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count", "")}
    return {fam.name + s for fam in registry.collect() for s in suffixes.get(fam.type, ("",))}


def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", RULES)
    assert "SUCCESS" in out


def test_rules_unit_tests_pass() -> None:
    out = promtool("test", "rules", RULES_TEST)
    assert "SUCCESS" in out


def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    out = promtool("check", "config", CONFIG)
    assert "1 rule files found" in out
    # The target-down alerts select jobs by these names.
    jobs = re.findall(r"job_name:\s*(\S+)", CONFIG.read_text())
    assert "avatarfarm-scheduler" in jobs and all(j.startswith("avatarfarm") for j in jobs), jobs


def test_every_alert_and_recording_rule_is_unit_tested() -> None:
    rules, tests = RULES.read_text(), RULES_TEST.read_text()
    for name in recorded_names():
        assert re.search(rf"expr: {re.escape(name)}\b", tests), f"{name} has no promql_expr_test"
    for alert in re.findall(r"^\s*-\s*alert:\s*(\S+)", rules, re.M):
        cases = re.findall(rf"alertname: {alert}\n\s*eval_time: \S+\s*(?:#.*)?\n\s*exp_alerts:(.*)",
                           tests)
        assert any(c.strip() == "[]" for c in cases), f"{alert}: no case where it must not fire"
        assert any(c.strip() == "" for c in cases), f"{alert}: no case where it fires"


def test_rules_read_metrics_the_farm_exports() -> None:
    exported = exported_names(SchedulerMetrics().registry) | exported_names(WorkerMetrics().registry)
    used = set(_RAW.findall(RULES.read_text()))
    assert used, "no raw metric found in the rules"
    assert used <= exported, f"not exported by scheduler/metrics.py or workers/metrics.py: " \
                             f"{sorted(used - exported)}"


def test_every_dashboard_query_reads_recording_rules(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    targets = list(panel_targets(dashboard))
    assert len(targets) >= 9
    recorded = recorded_names()
    for title, expr in targets:
        names = series_names(expr)
        assert names, f"{title}: {expr!r} selects no series"
        assert names <= recorded, f"{title}: {expr!r} reads {sorted(names - recorded)}, " \
                                  f"which rules.yml does not record"
    # Every query parses: promtool checks them as the expressions of throwaway rules.
    check = tmp_path / "dashboard_queries.yml"
    check.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(targets)]}]}))
    promtool("check", "rules", check)


def test_the_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids, datasource = [], "${" + var["name"] + "}"
    for p in dashboard["panels"]:
        ids.append(p["id"])
        if p["type"] != "row":
            assert p["datasource"]["uid"] == datasource, p["title"]
            assert all(t["datasource"]["uid"] == datasource for t in p["targets"]), p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    assert len(ids) == len(set(ids))


def test_series_names_finds_metrics_not_functions_labels_or_durations() -> None:
    assert series_names('sum by (tier) (rate(x_total{le="+Inf"}[5m] offset 10m)) / on (tier) '
                        'group_left () a:b:c or vector(1) and histogram_quantile(0.9, y)') == \
        {"x_total", "a:b:c", "y"}
