"""A strict reader of GET /metrics: parsed by prometheus-client's own parser, queried by name and labels."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    def __init__(self, text: str):
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        self.names = {s.name for s in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the `name` samples whose labels include `labels`; fails when there is none."""
        matching = [s.value for s in self.samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert matching, f"no sample {name}{labels}"
        return sum(matching)

    def get(self, name: str, **labels: str) -> float:
        """As value(), but 0 for a series not created yet (labelled ones appear on first use)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(http: httpx.Client) -> Scrape:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def wait_for(http: httpx.Client, condition, timeout: float = 10.0) -> Scrape:
    """Scrapes until `condition(scrape)` holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition(current := scrape(http)):
        assert time.monotonic() < deadline, "the metrics did not reach the expected state"
        time.sleep(0.05)
    return current


def idle(s: Scrape) -> bool:
    return s.value("llamaserve_num_requests_running") == 0 and s.value("llamaserve_num_requests_waiting") == 0
