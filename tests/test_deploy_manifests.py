"""deploy/: every manifest parses, has the fields its kind requires, runs ``itr`` subcommands that exist on paths
that exist, asks for consistent resources, and holds no credentials in plain text. No kubectl or docker here:
the structure is checked against the Kubernetes / KubeRay ``ray.io/v1`` schemas' required fields by hand."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PYPROJECT = (REPO / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', PYPROJECT).group(1)
MLFLOW_MIN = re.search(r'"mlflow>=([0-9.]+)', PYPROJECT).group(1)
PROJECT_IMAGE = re.compile(r"^[a-z0-9.\-/]+/itr-orchestrator:(?P<tag>[\w.\-]+)$")


def k8s_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "docker-compose.yml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in k8s_files() for d in documents(p)]


def docs_of(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_docs() if d.get("kind") == kind]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a workload document."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(kind, spec["template"]["spec"])]
    if kind == "CronJob":
        return [(kind, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "RayCluster":
        out = [("head", spec["headGroupSpec"]["template"]["spec"])]
        out += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
        return out
    if kind == "RayJob":
        out = [("submitter", spec["submitterPodTemplate"]["spec"])] if "submitterPodTemplate" in spec else []
        if "rayClusterSpec" in spec:
            out += pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
        return out
    return []


def containers() -> list[tuple[Path, str, dict]]:
    return [
        (p, where, c)
        for p, d in all_docs()
        for where, pod in pod_specs(d)
        for c in pod.get("initContainers", []) + pod["containers"]
    ]


def quantity(value) -> float:
    """A Kubernetes quantity (``500m``, ``8``, ``16Gi``) as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def itr_commands(text: str) -> list[list[str]]:
    """Every ``itr <subcommand> ...`` command line inside a shell text (up to ``||``, ``;``, ``&&`` or a newline)."""
    out = []
    for match in re.finditer(r"(?:^|[\s/;&|(])itr\s+([a-z][^\n;&|]*)", text.replace("\\\n", " ")):
        out.append(shlex.split(match.group(1).replace('"', "").replace("'", "")))
    return out


def repo_path(arg: str) -> Path | None:
    """The repository file an image path (``/app/x``) or a relative path names, None for other paths."""
    if arg.startswith("/app/"):
        return REPO / arg[len("/app/") :]
    if arg.endswith((".yaml", ".yml")) and not arg.startswith("/"):
        return REPO / arg
    return None


# ------------------------------------------------------------------------------------------- parsing
def test_every_manifest_parses_and_has_the_fields_of_its_kind():
    files = k8s_files()
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-sweep.yaml",
        "kuberay/shared-volume.yaml",
        "mlflow/k8s.yaml",
        "cron/reproduce-cronjob.yaml",
    }
    kinds = set()
    for path, doc in all_docs():
        where = f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert {"apiVersion", "kind", "metadata"} <= set(doc), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), where
        assert doc["metadata"].get("namespace", "itr") == "itr" or doc["kind"] == "Namespace", where
        if doc["kind"] not in ("Namespace", "ConfigMap"):
            assert isinstance(doc.get("spec"), dict), where
        kinds.add(doc["kind"])
        expected_api = {
            "RayCluster": "ray.io/v1",
            "RayJob": "ray.io/v1",
            "CronJob": "batch/v1",
            "Job": "batch/v1",
            "Deployment": "apps/v1",
            "StatefulSet": "apps/v1",
        }.get(doc["kind"], "v1")
        assert doc["apiVersion"] == expected_api, where
    assert {"RayCluster", "RayJob", "CronJob", "Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"} <= kinds


def test_workloads_select_their_own_pods_and_services_find_them():
    labels_by_pod = []
    for path, doc in all_docs():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{path.name}:{doc['metadata']['name']}"
            labels_by_pod.append(labels)
    for _path, doc in docs_of("Service"):
        selector = doc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in labels_by_pod), doc["metadata"]["name"]
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", "services stay inside the cluster"


# ------------------------------------------------------------------------------------------- KubeRay
def test_raycluster_head_is_cpu_only_and_gpu_group_autoscales_within_bounds():
    ((path, cluster),) = docs_of("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == RAY_PIN
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    assert groups and any(int(g["rayStartParams"].get("num-gpus", 0)) > 0 for g in groups)
    for group in groups:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for value in group["rayStartParams"].values():
            assert isinstance(value, str), "KubeRay wants rayStartParams values as strings"
        res = group["template"]["spec"]["containers"][0]["resources"]
        gpus = int(group["rayStartParams"].get("num-gpus", "0"))
        assert int(res["limits"].get("nvidia.com/gpu", 0)) == gpus, "ray start must offer what the pod gets"
        assert int(res["requests"].get("nvidia.com/gpu", gpus)) == gpus
        if "num-cpus" in group["rayStartParams"]:
            assert float(group["rayStartParams"]["num-cpus"]) <= quantity(res["limits"]["cpu"])
        if gpus:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
    # the CUSA recipes ask for 4 GPU workers: the group can grow to that
    assert max(g["maxReplicas"] * int(g["rayStartParams"].get("num-gpus", "0")) for g in groups) >= 4


def test_rayjob_targets_the_raycluster_and_runs_an_existing_sweep():
    ((_, cluster),) = docs_of("RayCluster")
    ((_, job),) = docs_of("RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec  # uses the running cluster, creates none
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    commands = itr_commands(spec["entrypoint"])
    assert len(commands) == 1 and spec["entrypoint"].lstrip().startswith("itr ")
    args = build_parser().parse_args(commands[0])  # raises SystemExit on an unknown subcommand or flag
    assert args.command == "sweep"
    space = repo_path(args.space)
    assert space is not None and space.is_file(), args.space
    from orchestrator.search_space import load_space

    loaded = load_space(space, [a for a in args.set if not a.startswith("data.root=")])
    assert loaded.spec.resources.gpu >= 1, "the RayJob's sweep should use the GPU worker group"
    gpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if int(g["rayStartParams"].get("num-gpus", 0)))
    assert loaded.spec.resources.cpu <= float(gpu_group["rayStartParams"]["num-cpus"])


# -------------------------------------------------------------------------------- images and commands
def test_every_project_container_runs_this_version_of_the_project_image():
    found = 0
    for path, where, container in containers():
        image = container["image"]
        assert ":" in image and not image.endswith(":latest"), f"{path.name}:{where}: pin the image tag"
        match = PROJECT_IMAGE.match(image)
        if match:
            found += 1
            assert match.group("tag") == VERSION, f"{path.name}:{where}: {image} is not version {VERSION}"
        if "itr-mlflow-server" in image:
            assert image.rsplit(":", 1)[1] >= MLFLOW_MIN
    assert found >= 4  # head, GPU workers, RayJob submitter, the CronJobs


def test_commands_call_itr_subcommands_that_exist_on_files_that_exist():
    parser = build_parser()
    texts = [(p.name, " ".join(c.get("command", []) + c.get("args", []))) for p, _, c in containers()]
    texts += [(p.name, d["spec"]["entrypoint"]) for p, d in docs_of("RayJob")]
    texts += [(p.name, p.read_text()) for p in (DEPLOY / "cron").iterdir() if p.suffix == ".sh"]
    seen = set()
    for name, text in texts:
        for argv in itr_commands(text):
            # the loops over $RECIPES: checked against the recipe lists below; here one stands in for all
            argv = [a.replace("$recipe", "coco_mini_tiny.yaml") for a in argv]
            args = parser.parse_args(argv)
            seen.add(args.command)
            for value in vars(args).values():
                for item in value if isinstance(value, list) else [value]:
                    target = repo_path(item) if isinstance(item, str) else None
                    if target is not None:
                        assert target.is_file(), f"{name}: {item}"
    assert {"sweep", "reproduce"} <= seen
    # the recipes the loops submit
    ((_, nightly),) = [(p, d) for p, d in docs_of("CronJob") if d["metadata"]["name"] == "itr-reproduce-nightly"]
    env = {
        e["name"]: e.get("value")
        for e in nightly["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    script = (DEPLOY / "cron" / "reproduce-nightly.sh").read_text()
    vm_recipes = re.search(r'RECIPES="\$\{RECIPES:-([^}]*)\}"', script).group(1)
    for recipes in (env["RECIPES"], vm_recipes):
        for recipe in recipes.split():
            assert (REPO / "recipes" / recipe).is_file(), recipe
    assert "coco_mini_tiny.yaml" in env["RECIPES"].split()


def test_cronjobs_and_crontab_schedule_the_reproductions():
    cron_field = r"(\*|\d+(-\d+)?(,\d+(-\d+)?)*)(/\d+)?"
    for _path, doc in docs_of("CronJob"):
        spec = doc["spec"]
        fields = spec["schedule"].split()
        assert len(fields) == 5 and all(re.fullmatch(cron_field, f) for f in fields), spec["schedule"]
        assert spec["concurrencyPolicy"] == "Forbid"
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
        text = yaml.safe_dump(job)
        assert "itr reproduce" in text and "--against-last-pass" in text and "ray job submit" in text
    lines = [
        ln
        for ln in (DEPLOY / "cron" / "crontab").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]
    ]
    assert len(lines) == 1
    fields = lines[0].split()
    assert all(re.fullmatch(cron_field, f) for f in fields[:5])
    script = fields[5]
    assert script.startswith("/opt/itr/") and (REPO / script[len("/opt/itr/") :]).is_file()
    assert (DEPLOY / "cron" / "reproduce-nightly.sh").stat().st_mode & 0o111, "the script must be executable"


def test_resources_requests_fit_their_limits():
    for path, where, container in containers():
        res = container.get("resources")
        assert res and "limits" in res and "requests" in res, f"{path.name}:{where}:{container['name']}"
        for key, limit in res["limits"].items():
            request = res["requests"].get(key)
            if request is not None:
                assert quantity(request) <= quantity(limit), f"{path.name}:{where}:{container['name']}:{key}"


# ------------------------------------------------------------------------------------------- secrets
SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)


def test_credentials_come_only_from_secret_refs():
    assert not docs_of("Secret"), "no Secret objects in the repository: create them with kubectl (README step 2)"
    checked = 0
    for path, where, container in containers():
        for env in container.get("env", []):
            if SECRET_ENV.search(env["name"]):
                checked += 1
                assert "value" not in env, f"{path.name}:{where}: {env['name']} in plain text"
                assert "secretKeyRef" in env["valueFrom"], f"{path.name}:{where}: {env['name']}"
            elif "$(" in str(env.get("value", "")):
                refs = re.findall(r"\$\((\w+)\)", env["value"])  # built from secret variables defined earlier
                names = [e["name"] for e in container["env"]]
                assert all(r in names[: names.index(env["name"])] for r in refs), env["name"]
    assert checked >= 8


def test_notify_urls_reach_the_reproduce_driver_from_a_secret_only():
    """``itr reproduce`` runs as the CronJobs' Ray job driver on the head: the head alone gets $ITR_NOTIFY_URLS,
    from the itr-notify Secret; no manifest, command or script holds a URL for it."""
    from orchestrator.notify import ENV_VAR

    ((_, cluster),) = docs_of("RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "itr-notify", "optional": True}} in head["envFrom"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert all("envFrom" not in c for c in group["template"]["spec"]["containers"]), group["groupName"]
    head_service = f"http://{cluster['metadata']['name']}-head-svc.{cluster['metadata']['namespace']}.svc"
    crons = docs_of("CronJob")
    assert crons
    for _, cron in crons:
        (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_DASHBOARD"].startswith(head_service), cron["metadata"]["name"]
    for path, where, container in containers():
        assert ENV_VAR not in [e["name"] for e in container.get("env", [])], f"{path.name}:{where}"
        assert "--notify" not in " ".join(container.get("command", []) + container.get("args", []))
    assert all("--notify" not in d["spec"]["entrypoint"] for _, d in docs_of("RayJob"))
    for script in (DEPLOY / "cron").glob("*.sh"):
        assert all("--notify" not in argv for argv in itr_commands(script.read_text())), script.name
    readme = (DEPLOY / "README.md").read_text()
    assert f"create secret generic itr-notify --from-literal={ENV_VAR}=" in readme


PLAIN_CREDENTIALS = [
    (r"AKIA[0-9A-Z]{16}", "an AWS access key id"),
    (r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "a private key"),
    (r"\b[a-z][a-z0-9+.-]*://[^\s:/@$]+:[^\s@$({]+@", "a URL with a literal password"),
    (
        r"(?i)[a-z_]*(password|passwd|secret|token|access_key)[a-z_]*[ \t]*[:=][ \t]*['\"]?(?![$({\s])"
        r"[A-Za-z0-9+/_\-]{6,}",
        "a credential assigned a literal value",
    ),
    (r"(?i)--(password|token)[= ]+(?!\"?\$)\S+", "a credential on a command line"),
    (r"ghp_[A-Za-z0-9]{20,}|xox[bp]-[A-Za-z0-9-]{10,}", "an API token"),
]


def credential_hits(text: str) -> list[str]:
    return [what for pattern, what in PLAIN_CREDENTIALS if re.search(pattern, text)]


def test_no_plain_text_credentials_in_any_deploy_file():
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        hits = credential_hits(path.read_text(errors="replace"))
        assert not hits, f"{path.relative_to(REPO)}: {hits}"
    env_example = (DEPLOY / "mlflow" / ".env.example").read_text()
    for line in env_example.splitlines():
        if line and not line.startswith("#") and SECRET_ENV.search(line.split("=")[0]):
            assert line.endswith("="), f".env.example ships no value: {line}"
    assert ".env" in (DEPLOY / "mlflow" / ".gitignore").read_text().split()


@pytest.mark.parametrize(
    "text",
    [
        "password: hunter2hunter2",
        "AWS_SECRET_ACCESS_KEY=abcdefgh12345",
        "postgresql://mlflow:s3cretpw@db:5432/mlflow",
        "AKIAIOSFODNN7EXAMPLE",
        "mc alias set s http://m:9000 admin --password=abc123",
    ],
)
def test_the_credential_scan_catches_plain_text(text):
    assert credential_hits(text), text


@pytest.mark.parametrize(
    "text",
    [
        "valueFrom: {secretKeyRef: {name: s, key: password}}",
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@mlflow-postgres:5432/mlflow",
        "MLFLOW_AUTH_ADMIN_PASSWORD: ${MLFLOW_AUTH_ADMIN_PASSWORD:?set it}",
        "POSTGRES_PASSWORD=",
        '--from-literal=password="$RAY_PW"',
    ],
)
def test_the_credential_scan_lets_references_through(text):
    assert not credential_hits(text), text


# ------------------------------------------------------------------------------------ MLflow server
def test_mlflow_server_uses_postgres_s3_and_basic_auth():
    ((_, deployment),) = [(p, d) for p, d in docs_of("Deployment") if d["metadata"]["name"] == "mlflow"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "--app-name" in container["command"] and "basic-auth" in container["command"]
    assert container["command"][container["command"].index("--workers") + 1] != "0"
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    ((_, cluster),) = docs_of("RayCluster")
    uri = next(
        e["value"]
        for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "MLFLOW_TRACKING_URI"
    )
    client_host = re.match(r"https?://([^/]+)", uri).group(1)
    import fnmatch

    assert any(fnmatch.fnmatch(client_host, h) for h in hosts), "the server would reject the Ray pods' Host header"
    ((_, configmap),) = docs_of("ConfigMap")
    shipped, mounted = configparser.ConfigParser(), configparser.ConfigParser()
    shipped.read_string((DEPLOY / "mlflow" / "basic_auth.ini").read_text())
    mounted.read_string(configmap["data"]["basic_auth.ini"])
    assert dict(shipped["mlflow"]) == dict(mounted["mlflow"])
    assert "admin_password" not in shipped["mlflow"]


def test_compose_file_binds_loopback_and_takes_credentials_from_env():
    compose = yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} must bind loopback"
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_ENV.search(key) or key in ("MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID"):
                assert str(value).startswith("${"), f"{name}: {key}"
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "basic-auth" in mlflow["command"]


# ------------------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_pins_torch_before_the_project_and_drops_root():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    runs = [i for i, ln in enumerate(lines) if ln.startswith("RUN")]
    torch_at = next(i for i in runs if "torch==2.14.1" in lines[i] and "torchvision==0.29.1" in lines[i])
    project_at = next(i for i in runs if re.search(r'pip install "?\.(\[|"|\s|$)', lines[i]))
    assert torch_at < project_at
    assert any(f"ray[default,train,tune]=={RAY_PIN}" in lines[i] for i in runs)
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY")}
    assert {"orchestrator", "methods", "recipes", "search_spaces", "configs"} <= copied
    assert [ln for ln in lines if ln.startswith("USER")][-1] in ("USER 1000", "USER ray")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*" and "!orchestrator/" in ignore
    mlflow_docker = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    assert "psycopg2" in mlflow_docker and "boto3" in mlflow_docker and "USER 1000" in mlflow_docker


def test_readme_walks_through_every_file():
    text = (DEPLOY / "README.md").read_text()
    for path in [p for p in DEPLOY.rglob("*") if p.is_file() and p.name not in ("README.md", ".gitignore")]:
        assert path.relative_to(DEPLOY).as_posix() in text or path.name in text, path
    steps = re.findall(r"^## (\d+)\. ", text, re.M)
    assert steps == [str(i) for i in range(1, len(steps) + 1)] and len(steps) >= 6
