"""deploy/prometheus/rules.yml: the SLO rules, checked and unit-tested by promtool.

- `promtool check rules` accepts the file; `promtool test rules` passes its unit tests
  (deploy/prometheus/rules_test.yml), which cover every alert, firing and quiet.
- Every series the rules read is one the server exports (or `up`, or a rule's own).
- The thresholds agree with the server: the latency budget is a bucket bound of the
  request histogram, the queue threshold a share of the default max_queue_size, and
  every status the server can count is either the server's failure or the caller's.

A real Prometheus loading these rules against a running server: test_prometheus.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import prom

needs_promtool = pytest.mark.skipif(prom.absent("promtool"), reason=prom.MISSING)


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(prom.RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alert(name: str) -> dict[str, Any]:
    (rule,) = [r for r in _rules() if r.get("alert") == name]
    return rule


def _exported_series() -> set[str]:
    """Every series name the server can expose, from its metrics module's registry."""
    from server.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


@needs_promtool
def test_promtool_check_rules() -> None:
    result = prom.promtool("check", "rules", str(prom.RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    result = prom.promtool("test", "rules", prom.RULES_TEST.name, cwd=prom.RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_read_only_series_the_server_exports() -> None:
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    exported = _exported_series()
    assert "resnet_serve_execution_provider" in exported
    for rule in rules:
        # metric names: identifiers not followed by "(" (functions) nor inside quotes
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])
        names = {n for n in re.findall(r"[a-zA-Z_:][\w:]*(?![\w:(])", expr)
                 if "resnet_serve" in n or n == "up"}  # fmt: skip
        assert names, rule
        unknown = names - exported - recorded - {"up"}
        assert not unknown, f"{rule.get('alert') or rule['record']}: {sorted(unknown)}"


def test_every_rule_is_unit_tested() -> None:
    tests = yaml.safe_load(prom.RULES_TEST.read_text())
    assert tests["rule_files"] == [prom.RULES.name]
    tested_alerts = {t["alertname"] for case in tests["tests"]
                     for t in case.get("alert_rule_test", [])}  # fmt: skip
    firing = {t["alertname"] for case in tests["tests"]
              for t in case.get("alert_rule_test", []) if t["exp_alerts"]}  # fmt: skip
    exprs = " ".join(t["expr"] for case in tests["tests"]
                     for t in case.get("promql_expr_test", []))  # fmt: skip
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert tested_alerts == alerts and firing == alerts, "each alert: a case where it fires"
    for rule in (r for r in _rules() if "record" in r):
        used = exprs + " ".join(r["expr"] for r in _rules() if r is not rule)
        assert rule["record"] in used, f"{rule['record']}: neither tested nor used"


def test_alerts_say_who_is_paged_and_why() -> None:
    for rule in (r for r in _rules() if "alert" in r):
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"ResnetServe[A-Z]\w+", rule["alert"])


def test_latency_budget_is_a_bucket_bound() -> None:
    from server.metrics import LATENCY_BUCKETS

    rule = _alert("ResnetServeLatencyBudgetExceeded")
    budget = float(re.fullmatch(r"model:\S+:p99_5m > ([\d.]+)", rule["expr"])[1])
    assert budget in LATENCY_BUCKETS, "the quantile interpolates within a bucket"
    assert f"{budget * 1000:.0f}ms budget" in rule["annotations"]["summary"]


def test_queue_threshold_is_near_the_default_max_queue_size() -> None:
    from server.repository.config import Batching

    rule = _alert("ResnetServeQueueNearlyFull")
    threshold = float(re.search(r">= (\d+)$", rule["expr"])[1])
    default = Batching.model_fields["max_queue_size"].default
    assert threshold == 0.75 * default
    assert f"({default} by default)" in rule["annotations"]["description"]


def test_errors_are_the_server_s_failures_not_the_caller_s() -> None:
    """Every status the server counts on resnet_serve_requests_total is classified: the
    caller's own (excluded from the SLO's errors) or the server's (counted)."""
    import grpc

    from server import errors

    name = "model:resnet_serve_request_errors:rate5m"
    (record,) = [r for r in _rules() if r.get("record") == name]
    excluded = set(re.search(r'code!~"([\w|]+)"', record["expr"])[1].split("|"))

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    counted = {errors.to_status(cls("x"))[0] for cls in subclasses(errors.ServeError)}
    # besides: unknown errors, and a call cancelled before or after its deadline
    counted |= {errors.to_status(RuntimeError())[0], grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}  # fmt: skip
    callers = {"OK", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS",
               "FAILED_PRECONDITION", "UNAUTHENTICATED", "UNIMPLEMENTED"}  # fmt: skip
    servers = {"INTERNAL", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    names = {code.name for code in counted}
    assert names <= callers | servers, f"classify {sorted(names - callers - servers)}"
    assert excluded == callers


@needs_promtool
def test_compose_prometheus_loads_the_rules(tmp_path: Path) -> None:
    """compose mounts rules.yml where its prometheus.yml looks for it, and promtool accepts
    that configuration with the mount in place."""
    compose_dir = prom.ROOT / "deploy" / "compose"
    service = yaml.safe_load((compose_dir / "compose.yaml").read_text())["services"]["prometheus"]
    mounts = {
        target: (compose_dir / source).resolve()
        for source, target, *_ in (v.split(":") for v in service["volumes"])
        if source.startswith(".")
    }
    config = yaml.safe_load((compose_dir / "prometheus.yml").read_text())
    assert config["rule_files"], "compose's Prometheus evaluates the SLO rules"
    for path in config["rule_files"]:
        assert mounts[path] == prom.RULES, path
    config["rule_files"] = [str(mounts[p]) for p in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = prom.promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_rules())} rules found" in result.stdout
