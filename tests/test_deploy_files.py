"""Static checks of the deployment files: compose, Kubernetes, Dockerfile, Prometheus, Grafana.

There is no Docker engine or cluster in CI, so these files are validated by reading
them: they parse, every path and name they reference exists, the ports, probes and
mount paths agree with each other and with the service config (which must validate as
`streamcl serve` would load it), and every metric the dashboard and the alerts use is
one `streamcl.deploy.runtime.metrics.ServiceMetrics` exports. promtool checks and
unit-tests the rules; without it those tests skip, unless STREAMCL_REQUIRE_PROMETHEUS=1
makes that a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from torch.distributed.run import get_args_parser

from streamcl.deploy.cli.kafka import service_config
from streamcl.deploy.runtime.config import ServiceConfig
from streamcl.deploy.runtime.distributed import rank_config
from streamcl.deploy.runtime.metrics import ServiceMetrics
from tests.prometheus import DASHBOARD, alert_rules, dashboard_exprs, render_grafana_expr

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
MULTIRANK = K8S / "multirank"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
CONFIG_PATH = "/etc/streamcl/service.yaml"
ALERT_NAMES = {
    "StreamclForgettingHigh",
    "StreamclAccuracyDrop",
    "StreamclLagGrowing",
    "StreamclRejectionSurge",
    "StreamclLearnerStalled",
    "StreamclCheckpointsFailing",
    "StreamclCheckpointStale",
    "StreamclQuarantineSurge",
}
BY_RANK = r" \* on \(job, instance\) group_left \(rank\) streamcl_rank_info"
"""The join that puts each target's rank on its series (metrics.py's module docstring)."""
METRIC_NAME = re.compile(r"\bstreamcl_[a-z0-9_]+\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def validated_config(path: Path) -> ServiceConfig:
    """The settings `streamcl serve --config path` would run with (no flags)."""
    return service_config(str(path), {})


def under(path: str | Path, directory: str | Path) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


# --- every file parses ------------------------------------------------------------------


YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
JSON_FILES = sorted(p for p in DEPLOY.rglob("*.json") if p.is_file())


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_file_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in documents)


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_json_file_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


def test_the_expected_files_exist() -> None:
    expected = [
        COMPOSE,
        DEPLOY / "compose" / "service.yaml",
        DOCKERFILE,
        K8S / "configmap.yaml",
        K8S / "statefulset.yaml",
        K8S / "service.yaml",
        K8S / "podmonitor.yaml",
        MULTIRANK / "configmap.yaml",
        MULTIRANK / "statefulset.yaml",
        MULTIRANK / "service.yaml",
        MULTIRANK / "podmonitor.yaml",
        MULTIRANK / "pvc.yaml",
        PROMETHEUS_DIR / "prometheus.yml",
        PROMETHEUS_DIR / "alerts.yml",
        PROMETHEUS_DIR / "alerts_test.yml",
        DASHBOARD,
        GRAFANA_PROVISIONING / "datasources" / "prometheus.yaml",
        GRAFANA_PROVISIONING / "dashboards" / "streamcl.yaml",
    ]
    assert [p for p in expected if not p.is_file()] == []


# --- compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)  # type: ignore[no-any-return]


def volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, container path) of each short-syntax volume entry."""
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        yield source, target


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of "HOST:CONTAINER" entries."""
    ports = {}
    for entry in service.get("ports", []):
        host, container = str(entry).rsplit(":", 1)
        ports[int(container)] = int(host.rsplit(":", 1)[-1])
    return ports


def test_compose_defines_the_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "kafka-init", "learner", "prometheus", "grafana"}


def test_compose_build_contexts_and_dockerfiles_exist(compose: dict[str, Any]) -> None:
    builds = {n: s["build"] for n, s in compose["services"].items() if "build" in s}
    assert set(builds) == {"learner"}
    for name, build in builds.items():
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert build.get("args", {}).get("VARIANT") in ("cpu", "gpu")


def test_compose_bind_mounts_exist_and_named_volumes_are_declared(
    compose: dict[str, Any],
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in volume_mounts(service):
            assert target.startswith("/"), f"{name}: container path {target!r} is not absolute"
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_compose_dependencies_are_defined_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on undefined {dependency!r}"
            assert condition in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert depends_on(services["learner"]) == {
        "kafka": "service_healthy",
        "kafka-init": "service_completed_successfully",
    }


@pytest.fixture(scope="module")
def compose_config(compose: dict[str, Any]) -> ServiceConfig:
    mounts = dict((t, s) for s, t in volume_mounts(compose["services"]["learner"]))
    assert CONFIG_PATH in mounts, f"the learner must mount its config at {CONFIG_PATH}"
    return validated_config(COMPOSE.parent / mounts[CONFIG_PATH])


def test_compose_learner_config_validates_and_listens_on_all_interfaces(
    compose: dict[str, Any], compose_config: ServiceConfig
) -> None:
    learner = compose["services"]["learner"]
    assert compose_config.http.host == "0.0.0.0"
    assert published_ports(learner) == {compose_config.http.port: compose_config.http.port}
    # Checkpoints and snapshots must land on a volume, not in the container's layer.
    volumes = [t for s, t in volume_mounts(learner) if not s.startswith((".", "/"))]
    assert any(under(compose_config.checkpoint.dir, v) for v in volumes)
    assert compose_config.snapshot.dir is not None
    assert any(under(compose_config.snapshot.dir, v) for v in volumes)


def test_compose_kafka_serves_the_learners_bootstrap_address_and_topics(
    compose: dict[str, Any], compose_config: ServiceConfig
) -> None:
    kafka = compose["services"]["kafka"]["environment"]
    advertised = [
        listener.split("://", 1)[1] for listener in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    ]
    for server in compose_config.kafka.bootstrap_servers.split(","):
        assert server in advertised
        assert server.split(":")[0] in compose["services"]
    command = " ".join(compose["services"]["kafka-init"]["command"])
    created = re.findall(r"--topic (\S+)", command)
    dead_letters = compose_config.kafka.dead_letter_topic or compose_config.kafka.topic + ".dlq"
    quarantine = compose_config.kafka.quarantine_topic or compose_config.kafka.topic + ".quarantine"
    assert set(created) == {compose_config.kafka.topic, dead_letters, quarantine}


def test_compose_prometheus_scrapes_the_learner(
    compose: dict[str, Any], compose_config: ServiceConfig
) -> None:
    service = compose["services"]["prometheus"]
    mounts = dict(volume_mounts(service))
    assert (COMPOSE.parent / mounts["./prometheus"]).name == "prometheus"
    assert (COMPOSE.parent / "prometheus").resolve() == PROMETHEUS_DIR
    flags = dict(f.split("=", 1) for f in service["command"] if "=" in f)
    config_in_container = PurePosixPath(flags["--config.file"])
    assert config_in_container.parent == PurePosixPath(mounts["./prometheus"])
    assert (PROMETHEUS_DIR / config_in_container.name).is_file()
    prometheus = load_yaml(PROMETHEUS_DIR / config_in_container.name)
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "streamcl"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"learner:{compose_config.http.port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert prometheus["rule_files"] == ["alerts.yml"]


def test_compose_grafana_mounts_provisioning_and_the_dashboard_where_the_provider_reads(
    compose: dict[str, Any],
) -> None:
    mounts = {
        t: (COMPOSE.parent / s).resolve() for s, t in volume_mounts(compose["services"]["grafana"])
    }
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA_PROVISIONING / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA_PROVISIONING / "dashboards"
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "streamcl.yaml")["providers"]
    assert provider["type"] == "file"
    dashboards = [t for t, s in mounts.items() if s == DASHBOARD]
    assert len(dashboards) == 1
    assert PurePosixPath(dashboards[0]).parent == PurePosixPath(provider["options"]["path"])


def test_grafana_datasource_is_the_dashboards_default_and_points_at_prometheus(
    compose: dict[str, Any],
) -> None:
    (source,) = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["current"]["value"] == source["uid"]


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"expected exec (JSON array) form, got {arguments!r}"
    return value


def test_dockerfile_variants_select_a_base_stage() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["VARIANT"] == "cpu"
    assert args["CPU_BASE"].startswith("python:3.11-slim")
    assert args["GPU_BASE"].startswith("nvidia/cuda:") and "runtime" in args["GPU_BASE"]
    froms = [a.split() for k, a in instructions if k == "FROM"]
    stages = {f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    assert {"base-cpu", "base-gpu"} <= stages
    assert froms[-1][0] == "base-${VARIANT}"


def test_dockerfile_copies_only_files_that_exist() -> None:
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in arguments:
            *sources, _ = shlex.split(arguments)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_runs_streamcl_serve_as_non_root_with_a_healthcheck(
    compose_config: ServiceConfig,
) -> None:
    instructions = dockerfile_instructions()
    users = [a for k, a in instructions if k == "USER"]
    assert users, "the image must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    (expose,) = [a for k, a in instructions if k == "EXPOSE"]
    assert expose.split() == [str(compose_config.http.port)]
    (healthcheck,) = [a for k, a in instructions if k == "HEALTHCHECK"]
    assert f"127.0.0.1:{compose_config.http.port}/healthz" in healthcheck
    (entrypoint,) = [a for k, a in instructions if k == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["streamcl"]
    (cmd,) = [a for k, a in instructions if k == "CMD"]
    assert exec_form(cmd) == ["serve", "--config", CONFIG_PATH]


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s by kind (one object of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    assert set(objects) == {"ConfigMap", "StatefulSet", "Service", "PodMonitor"}
    return objects


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def container(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (learner,) = k8s["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return learner  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def k8s_config(
    k8s: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> ServiceConfig:
    path = tmp_path_factory.mktemp("k8s") / "service.yaml"
    path.write_text(k8s["ConfigMap"]["data"]["service.yaml"])
    return validated_config(path)


def test_k8s_manifests_are_namespace_free(k8s: dict[str, dict[str, Any]]) -> None:
    assert [kind for kind, obj in k8s.items() if "namespace" in obj["metadata"]] == []


def test_k8s_statefulset_runs_one_learner_with_a_checkpoint_volume(
    k8s: dict[str, dict[str, Any]], k8s_config: ServiceConfig
) -> None:
    spec = k8s["StatefulSet"]["spec"]
    assert spec["replicas"] == 1
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    assert spec["serviceName"] == k8s["Service"]["metadata"]["name"]
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(k8s)["volumeMounts"]}
    assert under(k8s_config.checkpoint.dir, mounts[claim["metadata"]["name"]])
    resources = container(k8s)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    security = spec["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


def test_k8s_config_map_validates_and_is_mounted_where_serve_reads_it(
    k8s: dict[str, dict[str, Any]], k8s_config: ServiceConfig
) -> None:
    assert k8s_config.http.host == "0.0.0.0"
    pod = k8s["StatefulSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = []
    for mount in container(k8s)["volumeMounts"]:
        config_map = volumes.get(mount["name"], {}).get("configMap")
        if config_map and config_map["name"] == k8s["ConfigMap"]["metadata"]["name"]:
            for item in config_map["items"]:
                mounted.append(str(PurePosixPath(mount["mountPath"]) / item["path"]))
    assert mounted == [CONFIG_PATH]
    args = container(k8s).get("args", ["serve", "--config", CONFIG_PATH])
    assert args[args.index("--config") + 1] == CONFIG_PATH


def test_k8s_probes_hit_health_and_readiness_on_the_named_port(
    k8s: dict[str, dict[str, Any]], k8s_config: ServiceConfig
) -> None:
    learner = container(k8s)
    ports = {p["name"]: p["containerPort"] for p in learner["ports"]}
    assert ports == {"http": k8s_config.http.port}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert learner[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    annotations = k8s["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(k8s_config.http.port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_service_and_pod_monitor_select_the_pods_and_port(
    k8s: dict[str, dict[str, Any]],
) -> None:
    labels = k8s["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container(k8s)["ports"]}
    service = k8s["Service"]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["selector"], labels)
    (port,) = service["ports"]
    assert port["port"] == 8080 and port["targetPort"] in port_names
    monitor = k8s["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


# --- Kubernetes, several ranks (deploy/k8s/multirank) -----------------------------------


@pytest.fixture(scope="module")
def ranks_k8s() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s/multirank by kind (one object of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(MULTIRANK.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    kinds = {"ConfigMap", "StatefulSet", "Service", "PodMonitor", "PersistentVolumeClaim"}
    assert set(objects) == kinds
    return objects


@pytest.fixture(scope="module")
def ranks_config(
    ranks_k8s: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> ServiceConfig:
    path = tmp_path_factory.mktemp("multirank") / "service.yaml"
    path.write_text(ranks_k8s["ConfigMap"]["data"]["service.yaml"])
    return validated_config(path)


def torchrun_args(ranks_k8s: dict[str, dict[str, Any]]) -> argparse.Namespace:
    """The rank container's command parsed by torchrun's own parser, $(VAR)s expanded."""
    learner = container(ranks_k8s)
    assert learner["command"] == ["torchrun"]
    env = {e["name"]: e["value"] for e in learner["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in learner["args"]]
    return get_args_parser().parse_args(args)


def test_k8s_ranks_are_namespace_free_and_apart_from_the_single_learner(
    ranks_k8s: dict[str, dict[str, Any]], k8s: dict[str, dict[str, Any]]
) -> None:
    assert [kind for kind, obj in ranks_k8s.items() if "namespace" in obj["metadata"]] == []
    rank_labels = ranks_k8s["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    single_labels = k8s["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    # Neither variant's Service or PodMonitor picks up the other's pods.
    assert not selects(k8s["Service"]["spec"]["selector"], rank_labels)
    assert not selects(ranks_k8s["Service"]["spec"]["selector"], single_labels)
    names = {o["metadata"]["name"] for o in k8s.values()}
    assert names.isdisjoint(o["metadata"]["name"] for o in ranks_k8s.values())


def test_k8s_ranks_run_torchrun_with_a_c10d_rendezvous_on_pod_0(
    ranks_k8s: dict[str, dict[str, Any]],
) -> None:
    spec = ranks_k8s["StatefulSet"]["spec"]
    service = ranks_k8s["Service"]
    args = torchrun_args(ranks_k8s)
    assert int(args.nnodes) == spec["replicas"] >= 2
    assert args.nproc_per_node == "1"  # one rank per pod: each pod's port and probes
    assert args.rdzv_backend == "c10d" and args.rdzv_id and args.max_restarts >= 1
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{ranks_k8s['StatefulSet']['metadata']['name']}-0.{service['metadata']['name']}"
    assert args.module and args.training_script == "streamcl.deploy.cli"
    assert args.training_script_args == ["serve", "--config", CONFIG_PATH]
    ports = {p["name"]: p["containerPort"] for p in container(ranks_k8s)["ports"]}
    assert ports["rendezvous"] == int(port)
    assert {"rendezvous": int(port)}.items() <= {
        p["name"]: p["port"] for p in service["spec"]["ports"]
    }.items()
    # Pods start together (pod 0 is ready only once all have joined) and resolve unready.
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], spec["template"]["metadata"]["labels"])


def test_k8s_rank_pods_are_identical_and_torchrun_numbers_them(
    ranks_k8s: dict[str, dict[str, Any]],
) -> None:
    learner = container(ranks_k8s)
    launcher_set = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    assert launcher_set.isdisjoint(e["name"] for e in learner["env"])
    assert all("value" in e and "valueFrom" not in e for e in learner["env"])


def test_k8s_ranks_config_validates_splits_over_the_ranks_and_serves_the_pod_port(
    ranks_k8s: dict[str, dict[str, Any]], ranks_config: ServiceConfig
) -> None:
    assert ranks_config.http.host == "0.0.0.0"
    replicas = ranks_k8s["StatefulSet"]["spec"]["replicas"]
    ports = {p["name"]: p["containerPort"] for p in container(ranks_k8s)["ports"]}
    # What each rank runs with (refused if a global budget cannot be split this many ways).
    for rank in range(replicas):
        ranked = rank_config(ranks_config, rank, replicas, local_rank=0)
        assert ranked.http.port == ports["http"]
    pod = ranks_k8s["StatefulSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(ranks_k8s)["volumeMounts"]}
    config_map = volumes["config"]["configMap"]
    assert config_map["name"] == ranks_k8s["ConfigMap"]["metadata"]["name"]
    assert [str(PurePosixPath(mounts["config"]) / i["path"]) for i in config_map["items"]] == [
        CONFIG_PATH
    ]
    # Whichever pod becomes rank 0 reads and writes the one global checkpoint: shared volume.
    claim = ranks_k8s["PersistentVolumeClaim"]
    (name,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert volumes[name]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert under(ranks_config.checkpoint.dir, mounts[name])
    assert "volumeClaimTemplates" not in ranks_k8s["StatefulSet"]["spec"]


def test_k8s_rank_probes_and_pod_monitor_use_the_http_port(
    ranks_k8s: dict[str, dict[str, Any]], ranks_config: ServiceConfig
) -> None:
    learner = container(ranks_k8s)
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert learner[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    template = ranks_k8s["StatefulSet"]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ranks_config.http.port)
    monitor = ranks_k8s["PodMonitor"]["spec"]
    assert selects(monitor["selector"]["matchLabels"], template["metadata"]["labels"])
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint == {**endpoint, "port": "http", "path": "/metrics"}
    security = template["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


# --- metric names -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    """Every series name ServiceMetrics exports, with the type's suffixes."""
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.track_device_memory(lambda: 0.0)
    metrics.track_checkpoint_age(lambda: 0.0)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    dashboard: dict[str, Any], exported_names: set[str]
) -> None:
    queries = [e for _, e in dashboard_exprs(dashboard)]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queries += [rule["expr"] for rule in alert_rules()]
    used = {name for q in queries for name in METRIC_NAME.findall(q)}
    assert used, "no streamcl_ metric found in the dashboard or alerts"
    assert sorted(used - exported_names) == []


def test_the_dashboard_shows_every_exported_metric(
    dashboard: dict[str, Any], exported_names: set[str]
) -> None:
    shown = {name for _, e in dashboard_exprs(dashboard) for name in METRIC_NAME.findall(e)}
    families = {
        re.sub(r"_(total|bucket|sum|count)$", "", n)
        for n in exported_names
        if n.startswith("streamcl_")  # process_* come from prometheus_client's collector
    }
    shown_families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in shown}
    assert sorted(families - shown_families) == []


# --- dashboard ----------------------------------------------------------------------------


def test_dashboard_panels_have_queries_unique_ids_and_no_overlap(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    occupied: dict[tuple[int, int], int] = {}
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty expr"
            assert target["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = occupied.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"


def test_dashboard_data_source_is_a_prometheus_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    used = {m for _, e in dashboard_exprs(dashboard) for m in re.findall(r"\$(?!__)(\w+)", e)}
    assert used <= set(variables), f"undefined dashboard variables {used - set(variables)}"


def test_dashboard_covers_the_required_panels(dashboard: dict[str, Any]) -> None:
    exprs = [e for _, e in dashboard_exprs(dashboard)]
    required = [
        r"^sum by \(outcome\) \(rate\(streamcl_samples_total\{",
        r"^sum by \(reason\) \(rate\(streamcl_rejected_samples_total\{",
        r"^sum by \(partition\) \(streamcl_consumer_lag_messages\{",
        r"^histogram_quantile\(0\.5, .*streamcl_update_duration_seconds_bucket",
        r"^histogram_quantile\(0\.99, .*streamcl_update_duration_seconds_bucket",
        r"^histogram_quantile\(0\.5, .*streamcl_arrival_to_update_seconds_bucket",
        r"^histogram_quantile\(0\.99, .*streamcl_arrival_to_update_seconds_bucket",
        r"^streamcl_average_accuracy_ratio\{",
        r"^streamcl_average_forgetting_ratio\{",
        r"^streamcl_backward_transfer_ratio\{",
        r"^streamcl_prequential_accuracy_ratio\{",
        r"streamcl_group_accuracy_ratio\{",
        r"streamcl_group_forgetting_ratio\{",
        r'outcome="quarantined".* / sum\(rate\(streamcl_samples_total\{instance=~"\$instance"\}',
        r"^time\(\) - \(streamcl_last_checkpoint_timestamp_seconds\{",
        r"^histogram_quantile\(0\.99, .*streamcl_checkpoint_duration_seconds_bucket",
        r"increase\(streamcl_checkpoint_failures_total\{",
        r"increase\(streamcl_drift_events_total\{",
        r"streamcl_model_version\{",
        # Ranks (a single process is rank 0 of 1): throughput, step time, communication, lag.
        rf"^sum by \(rank\) \(rate\(streamcl_samples_total\{{outcome=\"learned\".*{BY_RANK}",
        rf"^sum by \(rank\) \(rate\(streamcl_step_seconds_total\{{.*{BY_RANK}\{{[^}}]*\}}\)$",
        r"^sum by \(rank\) \(rate\(streamcl_communication_seconds_total.* / "
        r"sum by \(rank\) \(rate\(streamcl_step_seconds_total",
        rf"^sum by \(rank\) \(streamcl_consumer_lag_messages\{{.*{BY_RANK}",
    ]
    assert [r for r in required if not any(re.search(r, e) for e in exprs)] == []


# --- promtool -----------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is not None:
        return found
    message = "promtool not installed (Debian package prometheus)"
    if os.environ.get("STREAMCL_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"STREAMCL_REQUIRE_PROMETHEUS=1 but {message}")
    pytest.skip(message)


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, check=False, timeout=120
    )


def test_alerts_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", PROMETHEUS_DIR / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout


def test_alerts_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", PROMETHEUS_DIR / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_config_passes_promtool_check_config() -> None:
    result = run_promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_every_dashboard_query_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool checks the PromQL of recording rules, so each query becomes one.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": render_grafana_expr(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- alerts -------------------------------------------------------------------------------


def test_alerts_are_the_documented_set_with_severity_and_annotations() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert "for" in rule, rule["alert"]


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """Each alert fires for some learner and, in the same file, stays quiet for another."""
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing, quiet = set(), set()
    for test in tests["tests"]:
        instances = {
            m for s in test["input_series"] for m in re.findall(r'instance="([^"]+)"', s["series"])
        }
        for case in test["alert_rule_test"]:
            fired = {a["exp_labels"]["instance"] for a in case.get("exp_alerts") or []}
            if fired:
                firing.add(case["alertname"])
            if instances - fired:
                quiet.add(case["alertname"])
    assert firing == ALERT_NAMES
    assert quiet == ALERT_NAMES
