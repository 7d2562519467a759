"""deploy/ray/: the Ray Serve config and the KubeRay RayService. They pass Ray's own schema and
build the application; the application fails closed without API keys and Ray's proxy takes no
message larger than the plain server; and the RayService keeps Ray's control plane closed:
Ray's token authentication, the plain Deployment's security context with no service-account
token in the Ray containers, and a NetworkPolicy that lets only the cluster's own Ray pods
reach the head's GCS, dashboard and job ports. Offline: YAML parsed, properties asserted, and
the pod templates and the NetworkPolicy validated against the Kubernetes schemas."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_deploy import dockerfile_uid, k8s_documents, kubernetes_validate

pytest.importorskip("ray", reason="Ray Serve is a dev dependency")

RAY = Path(__file__).resolve().parents[2] / "deploy" / "ray"
GRPC_PROXY_PORT = 9000
HTTP_PROXY_PORT = 8000
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, METRICS_PORT, AGENT_PORT = 6379, 8265, 10001, 8080, 52365
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def serve_config() -> dict:
    return yaml.safe_load((RAY / "serve_config.yaml").read_text())


def rayservice_documents() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((RAY / "rayservice.yaml").read_text())}


def rayservice() -> dict:
    return rayservice_documents()["RayService"]


def embedded_serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def cluster() -> dict:
    return rayservice()["spec"]["rayClusterConfig"]


def pod_templates() -> dict[str, dict]:
    """{group: pod template} of the head and every worker group."""
    spec = cluster()
    groups = {"head": spec["headGroupSpec"]["template"]}
    groups |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return groups


def deployment_pod_spec() -> dict:
    return k8s_documents()["Deployment"]["spec"]["template"]["spec"]


def runnable_flags(flags: list[str]) -> list[str]:
    """A config's serve flags with a local store for its S3 one (nothing is contacted)."""
    return [f if not f.startswith("s3://") else "/tmp/store" for f in flags]


# -- the Serve configs --------------------------------------------------------------------


def test_ray_serve_config_names_the_app_and_services():
    """deploy/ray/serve_config.yaml: Ray's gRPC proxy registers loraplex's services, and the
    import path builds the application from `loraplex serve` flags."""
    from ray.serve import Application

    from loraplex.server.ray_serve import SERVICER_FUNCTIONS

    config = serve_config()
    assert config["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    built = builder({**app["args"], "serve_flags": runnable_flags(app["args"]["serve_flags"])})
    assert isinstance(built, Application)


def test_ray_configs_are_valid_serve_configs():
    """Both Ray Serve configs pass Ray's own schema; the RayService autoscales the engine
    replicas and its application builds with replicas "auto"."""
    from ray.serve.schema import ServeDeploySchema

    from loraplex.server.ray_serve import app_builder

    plain = serve_config()
    ServeDeploySchema.model_validate(plain)
    embedded = embedded_serve_config()
    schema = ServeDeploySchema.model_validate(embedded)
    (app,) = schema.applications
    (engine,) = app.deployments
    assert engine.name == "EngineReplica" and engine.autoscaling_config["max_replicas"] > 1
    assert embedded["grpc_options"] == plain["grpc_options"]
    assert embedded["http_options"] == plain["http_options"]
    flags = runnable_flags(app.args["serve_flags"])
    assert app_builder({**app.args, "serve_flags": flags}) is not None  # its flags parse
    with pytest.raises(ValueError, match="terminate TLS in front"):  # Ray's proxy has no TLS
        app_builder({"serve_flags": ["--insecure", "--tls-cert", "c.pem", "--tls-key", "k.pem"]})


@pytest.mark.parametrize("which", ["serve_config", "rayservice"])
def test_the_shipped_apps_need_their_key_file(which):
    """As shipped, both applications authenticate (--auth-keys, no opt-out); without the key
    file flag the same config refuses to build instead of serving open."""
    from loraplex.server.ray_serve import app_builder

    config = serve_config() if which == "serve_config" else embedded_serve_config()
    (app,) = config["applications"]
    flags = runnable_flags(app["args"]["serve_flags"])
    assert "--auth-keys" in flags and "--insecure" not in flags
    assert "--allow-plaintext-keys" in flags  # TLS ends in front of Ray's proxies
    assert "insecure" not in app["args"]
    keys = flags.index("--auth-keys")
    without_keys = flags[:keys] + flags[keys + 2 :]
    with pytest.raises(ValueError, match="--insecure"):
        app_builder({**app["args"], "serve_flags": without_keys})


@pytest.mark.parametrize("which", ["serve_config", "rayservice"])
def test_the_http_proxy_serves_the_openai_api_on_every_interface(which):
    """Ray's HTTP proxy listens on loopback unless told otherwise: the configs put it where
    the gRPC proxy is (every interface, what `proxy_options` gives `serve-ray`), and the
    application serves the HTTP API there (its flags leave --no-http off)."""
    from loraplex.server.ray_serve import PROXY_HOST, proxy_options

    config = serve_config() if which == "serve_config" else embedded_serve_config()
    http = config["http_options"]
    assert (http["host"], http["port"]) == (PROXY_HOST, HTTP_PROXY_PORT)
    options = proxy_options(GRPC_PROXY_PORT, HTTP_PROXY_PORT)["http_options"]
    assert (options.host, options.port) == (http["host"], http["port"])
    (app,) = config["applications"]
    assert "--no-http" not in app["args"]["serve_flags"]
    if which == "rayservice":  # KubeRay's serve Service targets the head's port named "serve"
        head = pod_templates()["head"]["spec"]["containers"][0]
        assert {"containerPort": HTTP_PROXY_PORT, "name": "serve"} in head["ports"]


@pytest.mark.parametrize("which", ["serve_config", "rayservice"])
def test_the_proxy_takes_no_larger_message_than_the_server(which):
    from loraplex.server.grpc_api.server import MAX_MESSAGE_BYTES
    from loraplex.server.ray_serve import PROXY_ENV

    config = serve_config() if which == "serve_config" else embedded_serve_config()
    env = config["controller_options"]["runtime_env"]["env_vars"]
    assert env == PROXY_ENV
    assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == MAX_MESSAGE_BYTES


# -- Ray's token authentication -----------------------------------------------------------


def test_ray_token_authentication_is_on():
    spec = cluster()
    # Ray >= 2.52 knows token authentication; KubeRay turns it on for every Ray container.
    assert tuple(int(p) for p in spec["rayVersion"].split(".")[:2]) >= (2, 52)
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"]
    # Nothing turns it off again in a container.
    for group, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token", group


def test_the_token_secret_is_documented_as_deployed():
    secret = cluster()["authOptions"]["secretName"]
    header = (RAY / "rayservice.yaml").read_text().split("apiVersion:")[0]
    readme = (RAY.parent / "README.md").read_text()
    for text in (header, readme):
        assert f"create secret generic {secret} --from-literal=auth_token=" in text


# -- the pods: the Deployment's security context, no service-account token ------------------


def test_ray_pods_run_as_the_plain_deployment_does():
    deployment = deployment_pod_spec()
    (server,) = [c for c in deployment["containers"] if c["name"] == "loraplex"]
    assert deployment["securityContext"]["runAsUser"] == dockerfile_uid()
    for group, template in pod_templates().items():
        spec = template["spec"]
        assert spec["securityContext"] == deployment["securityContext"], group
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"] == server["securityContext"], group
            # Writable: LORAPLEX_HOME and /tmp (Ray's sessions and logs), on pod volumes.
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert {env["LORAPLEX_HOME"], "/tmp"} <= mounts, group
    # The autoscaler KubeRay adds to the head pod runs under the same container context.
    assert cluster()["autoscalerOptions"]["securityContext"] == server["securityContext"]


def test_no_service_account_token_in_the_ray_containers():
    for group, template in pod_templates().items():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, group
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert not mount["mountPath"].startswith(SA_TOKEN_PATH), group
                assert "serviceAccountToken" not in str(volumes[mount["name"]]), group
    # Only the autoscaler, which scales the worker pods through the Kubernetes API, gets one.
    (mount,) = cluster()["autoscalerOptions"]["volumeMounts"]
    head_volumes = {v["name"]: v for v in pod_templates()["head"]["spec"]["volumes"]}
    sources = head_volumes[mount["name"]]["projected"]["sources"]
    assert mount["mountPath"] == SA_TOKEN_PATH and mount["readOnly"] is True
    assert any("serviceAccountToken" in source for source in sources)


def as_pod(template: dict) -> dict:
    """A pod template as the Pod KubeRay makes of it (for the Kubernetes schema)."""
    return {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(template)}


@pytest.mark.parametrize("group", ["head", "engines"])
def test_ray_pod_templates_validate_against_the_kubernetes_schemas(group):
    validator = kubernetes_validate()
    pod = as_pod(pod_templates()[group])
    pod["metadata"]["name"] = f"loraplex-{group}"
    for version in ("1.27.0", validator.latest_version()):
        validator.validate(pod, version, strict=True)


# -- the NetworkPolicy ----------------------------------------------------------------------


def network_policy() -> dict:
    return rayservice_documents()["NetworkPolicy"]


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against labels; {} matches all."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not holds:
            return False
    return True


def admits(policy: dict, port: int, labels: dict[str, str], other_namespace: bool) -> bool:
    """Whether `policy` lets a pod with `labels` (in the policy's namespace, or another) reach
    a selected pod's TCP `port` (NetworkPolicy semantics: the rules are a union)."""
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(
            p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports
        ):
            continue
        peers = rule.get("from")
        if not peers:
            return True  # no `from`: every source
        for peer in peers:
            assert "ipBlock" not in peer, "an address block admits what no selector names"
            namespaces = peer.get("namespaceSelector")
            if other_namespace and namespaces is None:
                continue  # a pod selector alone: the policy's own namespace
            if matches(peer.get("podSelector", {}), labels):
                return True
    return False


def test_the_network_policy_covers_every_ray_pod():
    policy = network_policy()
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    for group, template in pod_templates().items():
        assert matches(spec["podSelector"], template["metadata"]["labels"]), group
    # Not the plain Deployment's pods: they serve their own port to everyone.
    deployment = k8s_documents()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not matches(spec["podSelector"], deployment)


def test_only_the_clusters_ray_pods_reach_the_heads_control_ports():
    policy = network_policy()
    head = pod_templates()["head"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert (ports["gcs"], ports["dashboard"]) == (GCS_PORT, DASHBOARD_PORT)
    control = [GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, METRICS_PORT, AGENT_PORT]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    operator["app.kubernetes.io/component"] = "kuberay-operator"
    strangers = [
        ({}, False),
        ({"app.kubernetes.io/name": "loraplex", "app.kubernetes.io/component": "server"}, False),
        ({"app.kubernetes.io/name": "loraplex"}, False),
        (head["metadata"]["labels"], True),  # a look-alike in another namespace
    ]
    for port in control:
        for group, template in pod_templates().items():
            assert admits(policy, port, template["metadata"]["labels"], False), (group, port)
        for labels, elsewhere in strangers:
            assert not admits(policy, port, labels, elsewhere), (labels, port)
    # The KubeRay operator deploys the Serve config through the dashboard, and no more.
    assert admits(policy, DASHBOARD_PORT, operator, True)
    assert not any(
        admits(policy, port, operator, True) for port in control if port != DASHBOARD_PORT
    )
    # Clients reach Ray's gRPC and HTTP proxies (where loraplex's API keys apply) from anywhere.
    for port in (GRPC_PROXY_PORT, HTTP_PROXY_PORT):
        assert all(admits(policy, port, labels, True) for labels, _ in strangers)
    assert embedded_serve_config()["grpc_options"]["port"] == GRPC_PROXY_PORT
    assert embedded_serve_config()["http_options"]["port"] == HTTP_PROXY_PORT


def test_the_network_policy_validates_against_the_kubernetes_schemas():
    validator = kubernetes_validate()
    policy: Any = network_policy()
    for version in ("1.27.0", validator.latest_version()):
        validator.validate(policy, version, strict=True)
