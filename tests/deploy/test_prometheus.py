"""A real Prometheus (Debian's) scraping a real server, on loopback.

One `resnet-serve serve` process over the small CIFAR model, one Prometheus scraping its
/metrics every second and evaluating deploy/prometheus/rules.yml every second. After
some requests (one of them invalid):

- a PromQL query over Prometheus's HTTP API sees the model's request rate above 0;
- the rules load (/api/v1/rules lists both groups, every rule of the file) and evaluate
  without error on the server's real series, the recording rules give the model's rate,
  and nothing pages for a healthy server;
- the Grafana dashboard asks only for series the server's /metrics exposes, and every
  one of its queries returns data from this Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench import serving
from tests.deploy import procs, prom
from tests.reliability.repos import derive

MODEL = "cifar"
SERVER_FLAGS = ("--instances", "1", "--intra-op-threads", "1", "--decode-workers", "1")
CALLS = 20
DASHBOARD = prom.ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "resnet-serve.json"
# Grafana's variables, as the dashboard's "All" and a rate window that holds many scrapes
VARIABLES = {"$model": ".*", "$instance": ".*", "$__rate_interval": "1m"}

pytestmark = pytest.mark.skipif(prom.absent("prometheus"), reason=prom.MISSING)


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[serving.Server]:  # fmt: skip
    repo = tmp_path_factory.mktemp("prometheus-repo")
    derive(repo, model_repo / MODEL)
    logs = tmp_path_factory.mktemp("prometheus-server")
    started = serving.start(repo, logs / "server.log", SERVER_FLAGS)
    yield started
    assert started.stop() == 0, started.log()


@pytest.fixture(scope="module")
def prometheus(server: serving.Server, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[prom.Prometheus]:  # fmt: skip
    target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    started = prom.start(tmp_path_factory.mktemp("prometheus"), [target])
    yield started
    started.stop()


def _rate(prometheus: prom.Prometheus) -> float:
    found = prometheus.query(f'sum(rate(resnet_serve_requests_total{{model="{MODEL}"}}[1m]))')
    return float(found[0]["value"][1]) if found else 0.0


@pytest.fixture(scope="module")
def traffic(server: serving.Server, prometheus: prom.Prometheus) -> int:
    """Requests sent once Prometheus holds the model's counter (a series first seen
    at a value has no increase before it: rate() starts from that first sample)."""
    from resnet_serve_client import Client, InvalidArgument

    image = procs.jpeg()
    with Client(server.address, model=MODEL, timeout=60) as client:
        client.classify(image, top_k=1)
        prometheus.wait_for(
            "the first request's counter scraped",
            lambda: prometheus.query(f'resnet_serve_requests_total{{model="{MODEL}"}}'),
        )
        for _ in range(CALLS):
            (result,) = client.classify(image, top_k=3)
            assert result.model == MODEL
        with pytest.raises(InvalidArgument):  # counted as INVALID_ARGUMENT: the errors panels
            client.classify(b"not an image", top_k=1)
    return CALLS + 2


def test_prometheus_sees_the_request_rate(prometheus: prom.Prometheus, traffic: int) -> None:
    (up,) = prometheus.wait_for("the target scraped", lambda: prometheus.query("up"))
    assert up["metric"]["job"] == prom.JOB and up["value"][1] == "1"
    rate = prometheus.wait_for("a request rate above 0", lambda: _rate(prometheus))
    assert rate > 0
    (total,) = prometheus.query(f'sum(resnet_serve_requests_total{{model="{MODEL}"}})')
    assert float(total["value"][1]) == traffic


def _rule_groups(prometheus: prom.Prometheus) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in prometheus.api("rules")["groups"]}


def test_rules_load_and_evaluate(prometheus: prom.Prometheus, traffic: int) -> None:
    expected = {g["name"]: [r.get("alert") or r["record"] for r in g["rules"]]
                for g in yaml.safe_load(prom.RULES.read_text())["groups"]}  # fmt: skip
    groups = _rule_groups(prometheus)
    assert {n: [r["name"] for r in g["rules"]] for n, g in groups.items()} == expected
    assert all(g["file"] == str(prom.RULES) for g in groups.values())

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in _rule_groups(prometheus).values() for r in g["rules"]]
        return rules if all(r["health"] != "unknown" for r in rules) else []

    for rule in prometheus.wait_for("every rule evaluated", evaluated):
        assert rule["health"] == "ok", rule
    recorded = prometheus.wait_for(
        "the recorded request rate",
        lambda: prometheus.query(f'model:resnet_serve_requests:rate5m{{model="{MODEL}"}} > 0'),
    )
    assert recorded[0]["metric"] == {"__name__": "model:resnet_serve_requests:rate5m",
                                     "model": MODEL}  # fmt: skip


def test_a_healthy_server_pages_nobody(prometheus: prom.Prometheus, traffic: int) -> None:
    prometheus.wait_for("the rate recorded", lambda: _rate(prometheus))
    # the version serves: its execution-provider series carry the scrape's instance, the
    # session's index kept as exported_instance, which the not-serving rule relies on
    (provider,) = prometheus.query(f'resnet_serve_execution_provider{{model="{MODEL}"}}')
    labels = provider["metric"]
    assert labels["instance"] == prometheus.query("up")[0]["metric"]["instance"]
    assert labels["exported_instance"] == "0"
    for name in ("ResnetServeModelNotServing", "ResnetServeReplicaDown",
                 "ResnetServeReplicasAbsent", "ResnetServeErrorRatioHigh"):  # fmt: skip
        (rule,) = [r for g in _rule_groups(prometheus).values() for r in g["rules"]
                   if r["name"] == name]  # fmt: skip
        assert rule["state"] == "inactive" and not rule["alerts"], rule


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has queries"
    return exprs


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    names = set()
    for expr in [*_dashboard_exprs(), *variables]:
        expr = re.sub(r'"[^"]*"', '""', expr)
        names |= set(re.findall(r"[a-zA-Z_:][\w:]*(?![\w:(])", expr))
    return {n for n in names if n.startswith("resnet_serve_")}


def _exposed(text: str) -> set[str]:
    """The series names a /metrics text exposes: the samples it holds, and for a family
    declared without samples yet, the names its type gives it."""
    suffixes = {"counter": ("_total", "_created"), "info": ("_info",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}  # fmt: skip
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_dashboard_queries_only_series_the_server_exposes(
    server: serving.Server, prometheus: prom.Prometheus, traffic: int
) -> None:
    used = _dashboard_metrics()
    assert "resnet_serve_requests_total" in used and "resnet_serve_build_info" in used
    missing = used - _exposed(server.metrics())
    assert not missing, f"the dashboard queries series the server does not expose: {missing}"

    def query(expr: str) -> list[dict[str, Any]]:
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        return prometheus.query(expr)

    for expr in _dashboard_exprs():
        assert prometheus.wait_for(f"data for {expr}", lambda e=expr: query(e), limit=30)
