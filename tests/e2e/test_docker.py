"""docker/: the compose stack, Prometheus, collector and Grafana files parse and agree with each other and
with the live server: every flag the server is started with exists, every metric the dashboard queries
is exported. The image, the replicas' shutdown and the Kubernetes manifests: tests/unit/test_deploy_manifests.py."""

import argparse
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from llamaserve.cli import add_serve_parser
from tests.e2e.scrape import scrape

DOCKER = Path(__file__).parents[2] / "docker"
METRIC = re.compile(r"\bllamaserve_[a-z_]+\b")


def load_yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml("compose.yaml")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "llamaserve.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return queries


REPLICAS = ("llamaserve-1", "llamaserve-2")


def serve_args(compose: dict, replica: str) -> argparse.Namespace:
    command = compose["services"][replica]["command"]  # the flags of the image's `llamaserve serve`
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *command])  # fails on a flag the CLI does not have


def test_compose_wires_the_server_to_prometheus_and_the_collector(compose):
    services = compose["services"]
    assert set(services) == {*REPLICAS, "nginx", "prometheus", "grafana", "otel-collector", "jaeger"}
    for service in services.values():  # every bind-mounted file is in docker/
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), source

    collector = load_yaml("otel-collector.yaml")
    [job] = load_yaml("prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = []
    for replica in REPLICAS:
        assert (DOCKER / services[replica]["build"]["context"] / services[replica]["build"]["dockerfile"]).exists()
        args = serve_args(compose, replica)
        assert args.log_format == "json" and args.host == "0.0.0.0"
        endpoint = urlparse(args.otlp_traces_endpoint)
        assert endpoint.hostname == "otel-collector" and endpoint.path == "/v1/traces"
        assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(f":{endpoint.port}")
        targets.append(f"{replica}:{args.port}")
    # Each replica directly: through nginx every scrape would land on whichever replica it picks.
    assert job["static_configs"][0]["targets"] == targets


def test_the_collector_exports_traces_to_jaeger(compose):
    collector = load_yaml("otel-collector.yaml")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    [exporter] = pipeline["exporters"]
    assert urlparse("//" + collector["exporters"][exporter]["endpoint"]).hostname == "jaeger"
    assert all(p in collector["processors"] for p in pipeline["processors"])
    assert "jaeger" in compose["services"]


def test_grafana_is_provisioned_with_the_dashboards_datasource():
    datasource = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "llamaserve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]} and datasource["url"] == "http://prometheus:9090"
    assert load_yaml("grafana/provisioning/dashboards/llamaserve.yaml")["providers"][0]["options"]["path"] == \
        "/var/lib/grafana/dashboards"


def test_the_dashboard_shows_what_operators_need():
    queries = "\n".join(dashboard_queries())
    for needed in ("histogram_quantile(0.5, sum by (le) (rate(llamaserve_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(llamaserve_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.5, sum by (le) (rate(llamaserve_inter_token_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(llamaserve_inter_token_latency_seconds_bucket",
                   "rate(llamaserve_generation_tokens_total", "llamaserve_num_requests_running",
                   "llamaserve_num_requests_waiting", "llamaserve_kv_cache_usage_ratio",
                   "rate(llamaserve_preemptions_total", "rate(llamaserve_requests_rejected_total",
                   'finished_reason=~"error|abort"'):
        assert needed in queries, needed
    for query in dashboard_queries():
        assert query.count("(") == query.count(")") and query.count("{") == query.count("}"), query


def test_every_metric_the_dashboard_queries_is_exported(http):
    assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 2}).status_code == 200
    exported = scrape(http).names
    queried = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert len(queried) >= 12
    assert queried <= exported, queried - exported
