"""The deployment artefacts agree with the server: the Dockerfile, the compose replicas and every Kubernetes
manifest are parsed, their server flags go through the real CLI parser and configuration, and their ports,
probes and shutdown timeouts are checked against the drain the server performs (README, "Deploying behind
a load balancer"). Nothing here runs docker or a cluster."""

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llamaserve.api.metrics import Metrics
from llamaserve.cli import add_serve_parser, config_options
from llamaserve.config import EngineConfig, ServerConfig, load_config
from llamaserve.engine.client import EngineReady
from llamaserve.engine.messages import EngineStats

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"
REPLICAS = ("llamaserve-1", "llamaserve-2")
# Seconds the server needs past the drain to stop its engine and flush its last spans and log lines.
EXIT_MARGIN = 10


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comment lines dropped."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def instruction(name: str) -> str:
    """The last one wins, as in docker."""
    return [args for kind, args in dockerfile() if kind == name][-1]


def build_args() -> dict[str, str]:
    return dict(args.split("=", 1) for kind, args in dockerfile() if kind == "ARG")


def image_home() -> str:
    [home] = [m for kind, args in dockerfile() if kind == "ENV" for m in re.findall(r"\bHOME=(\S+)", args)]
    return home


def configs(flags: list[str]) -> tuple[argparse.Namespace, EngineConfig, ServerConfig]:
    """The flags of `llamaserve serve` as the CLI parses them and as the server configures itself from them;
    a --config inside the image (/app/configs/...) is read from the repository's configs/."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *flags])  # fails on a flag the CLI does not have
    config = args.config
    if config is not None:
        assert Path(config).parent == Path("/app/configs"), config  # where the Dockerfile copies configs/
        config = ROOT / "configs" / Path(config).name
    return (args, *load_config(config, **config_options(args)))


def entrypoint() -> list[str]:
    return json.loads(instruction("ENTRYPOINT"))


def exported_metrics() -> set[str]:
    ready = EngineReady(num_kv_blocks=100, block_size=16, max_model_len=2048, vocab_size=256, checkpoint="/x",
                        dtype="float32", tensor_parallel_size=1)
    text = Metrics("m", ready, EngineStats).render().decode()
    return {family.name for family in text_string_to_metric_families(text)}


def seconds(duration: str) -> float:
    """A compose duration such as 45s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# The image


def test_the_server_is_pid_1_and_stops_on_sigterm():
    assert entrypoint() == ["llamaserve", "serve"]  # exec form: no shell in between to swallow the signal
    assert "llamaserve" in (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]
    assert instruction("STOPSIGNAL") == "SIGTERM"
    _, _, server = configs(json.loads(instruction("CMD")))
    assert server.host == "0.0.0.0"
    assert instruction("EXPOSE") == str(server.port)


def test_the_image_runs_as_a_numeric_non_root_user():
    user = instruction("USER").split(":")
    assert user[0].isdigit() and int(user[0]) != 0 and user[-1] != "0"  # numeric, so runAsNonRoot can check
    assert image_home() == "/home/llamaserve"


def test_the_healthcheck_asks_health_on_the_servers_port():
    healthcheck = instruction("HEALTHCHECK")
    options, command = healthcheck.split(" CMD ", 1)
    command = json.loads(command)  # exec form
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")
    [(port, path)] = re.findall(r"http://127\.0\.0\.1:(\d+)(/[a-z]*)", command[2])
    _, _, server = configs(json.loads(instruction("CMD")))
    assert path == "/health" and int(port) == server.port
    flags = dict(option.removeprefix("--").split("=") for option in shlex.split(options))
    assert seconds(flags["timeout"]) < seconds(flags["interval"])
    assert seconds(flags["start-period"]) >= 300  # the port opens only once the model is loaded


def test_the_cuda_build_is_coherent():
    args = build_args()
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch  # the version the test suite runs on
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu[\d.]+", args["BASE_IMAGE"])
    assert cuda, args["BASE_IMAGE"]
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}"


def test_the_build_context_leaves_out_what_the_image_does_not_copy():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    copied = {src for kind, args in dockerfile() if kind == "COPY" for src in args.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "server", "configs"}
    assert not copied & ignored


# docker/compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_the_replicas_run_the_image_and_outlast_their_drain(compose):
    for replica in REPLICAS:
        service = compose["services"][replica]
        assert (DOCKER / service["build"]["context"]).resolve() == ROOT
        assert service["build"]["dockerfile"] == "Dockerfile"
        assert set(service["build"]["args"]) <= set(build_args())
        assert "entrypoint" not in service
        _, _, server = configs(service["command"])
        assert server.host == "0.0.0.0" and str(server.port) == instruction("EXPOSE")
        # docker stop: SIGTERM, then SIGKILL after stop_grace_period (10 s when unset).
        assert seconds(service["stop_grace_period"]) >= server.drain_grace + server.drain_timeout + EXIT_MARGIN / 2
        assert service["environment"]["LLAMASERVE_API_KEY"].startswith("${LLAMASERVE_API_KEY:-")
        [volume] = service["volumes"]
        assert volume.split(":")[1] == f"{image_home()}/.cache/llamaserve"
    caches = {compose["services"][replica]["volumes"][0].split(":")[0] for replica in REPLICAS}
    assert len(caches) == len(REPLICAS) and caches <= set(compose["volumes"])  # one conversion per folder


def test_nginx_fronts_the_replicas(compose):
    nginx = compose["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["ports"] == ["8000:8000"]
    assert {replica: {"condition": "service_healthy"} for replica in REPLICAS} == nginx["depends_on"]
    conf = (DOCKER / "nginx.conf").read_text()
    [upstream] = re.findall(r"upstream\s+\S+\s*\{([^}]*)\}", conf)
    ports = {configs(compose["services"][r]["command"])[2].port for r in REPLICAS}
    assert re.findall(r"^\s*server\s+([^\s;]+)", upstream, re.M) == [f"{r}:{port}" for r in REPLICAS
                                                                      for port in ports]
    assert re.search(r"^\s*listen\s+8000\b", conf, re.M)


def test_the_gpu_override_gives_each_replica_its_own_gpu():
    override = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert set(override["services"]) == set(REPLICAS)
    devices = []
    for replica in REPLICAS:
        service = override["services"][replica]
        defaults = build_args()
        assert service["build"]["args"] == {k: defaults[k] for k in ("BASE_IMAGE", "TORCH_INDEX")}
        _, engine, server = configs(service["command"])
        assert engine.model.device == "cuda" and server.host == "0.0.0.0"
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        devices += device["device_ids"]
    assert len(set(devices)) == len(REPLICAS)


# docker/k8s/


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = [doc for path in sorted((DOCKER / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"]["name"], doc
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == sorted({"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"})
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def deployment(manifests) -> dict:
    assert manifests["Deployment"]["apiVersion"] == "apps/v1"
    return manifests["Deployment"]


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict, port: int | str) -> int:
    """A probe's or a Service's port (a number or a port name) as the container port it reaches."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    return by_name[port] if isinstance(port, str) else port


def prestop_sleep(container: dict) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_the_container_runs_the_images_server_on_gpus(deployment, container):
    assert "command" not in container  # the image's ENTRYPOINT (`llamaserve serve`) stays; args are its flags
    _, engine, server = configs(container["args"])
    assert server.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "http"] == [server.port]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == engine.parallel.tensor_parallel_size
    assert engine.model.device == "cuda"
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and str(security["runAsUser"]) == instruction("USER").split(":")[0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert f"{image_home()}/.cache/llamaserve" in mounts and "/dev/shm" in mounts
    [key] = [e for e in container["env"] if e["name"] == "LLAMASERVE_API_KEY"]
    assert set(key["valueFrom"]["secretKeyRef"]) >= {"name", "key"}


def test_probes_ask_the_right_endpoints_on_the_servers_port(container):
    _, _, server = configs(container["args"])
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert container_port(container, get["port"]) == server.port, probe
        paths[probe] = get["path"]
    # Readiness turns 503 when the drain begins; liveness stays 200 through it, so it never kills a draining pod.
    assert paths == {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # loading (and downloading) a model


def test_the_pod_leaves_the_endpoints_before_it_refuses_and_is_killed_only_after_its_drain(deployment, container):
    _, _, server = configs(container["args"])
    readiness = container["readinessProbe"]
    # After SIGTERM new requests are still served for drain_grace while /ready says 503: the probe must see
    # it within that time.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= server.drain_grace
    # The grace period counts from the deletion: preStop, then the server's whole drain, then its exit.
    budget = prestop_sleep(container) + server.drain_grace + server.drain_timeout + EXIT_MARGIN
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= budget
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_the_service_reaches_the_pods(manifests, deployment, container):
    service = manifests["Service"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["selector"].items() <= labels.items()
    assert service.get("type", "ClusterIP") == "ClusterIP"
    [port] = service["ports"]
    assert container_port(container, port["targetPort"]) == configs(container["args"])[2].port


def test_the_disruption_budget_covers_the_same_pods(manifests, deployment):
    pdb = manifests["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert manifests["HorizontalPodAutoscaler"]["spec"]["minReplicas"] > 1  # one pod still serves during an eviction


def test_the_autoscaler_scales_the_deployment_on_its_queue(manifests, deployment):
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "llamaserve_num_requests_waiting"
    assert metric["pods"]["metric"]["name"] in exported_metrics()
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
