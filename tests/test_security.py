"""Security properties: loopback-only servers, safe deserialisation, no shell, redacted secrets."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "methods")


def _sources(*packages: str) -> list[tuple[Path, ast.Module]]:
    out = []
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            out.append((path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))))
    assert out, "no sources found"
    return out


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain ('' otherwise)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _calls(tree: ast.AST, suffix: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func).endswith(suffix)]


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_servers_bind_loopback_by_default():
    from orchestrator.cli import build_parser, ui_command

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    argv = ui_command("sqlite:///x.db", args.host, args.port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in argv
    # every local ray.init starts no dashboard (or binds it to loopback)
    inits = [(p, c) for p, tree in _sources("orchestrator") for c in _calls(tree, "ray.init")]
    assert inits, "expected ray.init calls in orchestrator/"
    for path, call in inits:
        dash = _kw(call, "include_dashboard")
        host = _kw(call, "dashboard_host")
        starts_local = _kw(call, "num_cpus") is not None  # the RAY_ADDRESS branch connects, starts nothing
        if not starts_local:
            continue
        ok = (isinstance(dash, ast.Constant) and dash.value is False) or (
            isinstance(host, ast.Constant) and host.value in ("127.0.0.1", "localhost")
        )
        assert ok, f"{path}:{call.lineno}: ray.init starts a dashboard that may bind all interfaces"


def test_every_torch_load_is_weights_only():
    calls = [(p, c) for p, tree in _sources(*PACKAGES) for c in _calls(tree, "torch.load")]
    assert calls, "expected torch.load calls"
    for path, call in calls:
        value = _kw(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"


def test_only_yaml_safe_load():
    bad = []
    for path, tree in _sources(*PACKAGES):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in {
                "yaml.load",
                "yaml.load_all",
                "yaml.unsafe_load",
                "yaml.full_load",
                "yaml.unsafe_load_all",
            }:
                bad.append(f"{path}:{node.lineno}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in {"UnsafeLoader", "FullLoader", "Loader"}
                and _dotted(node.value) == "yaml"
            ):
                bad.append(f"{path}:{node.lineno} ({node.attr})")
    assert not bad, bad


#: every PyYAML name that reads YAML text (loaders and the functions that run one)
YAML_READERS = {
    "load",
    "load_all",
    "safe_load",
    "safe_load_all",
    "full_load",
    "full_load_all",
    "unsafe_load",
    "unsafe_load_all",
    "compose",
    "compose_all",
    "parse",
    "scan",
    "Loader",
    "SafeLoader",
    "BaseLoader",
    "FullLoader",
    "UnsafeLoader",
    "CLoader",
    "CSafeLoader",
    "CBaseLoader",
    "CFullLoader",
    "CUnsafeLoader",
}
YAML_READER = REPO / "orchestrator" / "yaml_io.py"


def raw_yaml_reads(tree: ast.Module, path: Path) -> list[str]:
    """``file:line name`` of each use of a PyYAML reader in ``tree`` (``yaml.safe_load``, ``import yaml as y;
    y.compose``, ``from yaml import SafeLoader``, ``yaml.loader.SafeLoader``, ...)."""
    aliases = {"yaml"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "yaml"}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "yaml":
            names = [a.name for a in node.names]
            if node.module != "yaml" or any(n in YAML_READERS or n == "*" for n in names):
                bad.append(f"{path}:{node.lineno} from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Attribute) and node.attr in YAML_READERS:
            root = _dotted(node.value).split(".")[0]
            if root in aliases:
                bad.append(f"{path}:{node.lineno} {_dotted(node)}")
    return bad


def test_every_yaml_read_goes_through_yaml_io():
    """Configs, spaces, recipes, --set values, tracked artifacts and embedded configs are all read by the shared
    reader (duplicate keys, alias budget, line numbers); a raw ``yaml.safe_load`` anywhere else fails here."""
    bad = [hit for path, tree in _sources(*PACKAGES) if path != YAML_READER for hit in raw_yaml_reads(tree, path)]
    assert not bad, bad
    # the auditor sees the forms it must catch, and the reader itself is the one place that builds a loader
    probe = ast.parse(
        "import yaml as y\nfrom yaml import safe_load\nfrom yaml.loader import SafeLoader\n"
        "y.safe_load('a')\nyaml.compose('a')\nyaml.safe_dump({})\n"
    )
    assert len(raw_yaml_reads(probe, Path("probe.py"))) == 4
    reader = ast.parse(YAML_READER.read_text(encoding="utf-8"))
    assert [
        c.name
        for c in ast.walk(reader)
        if isinstance(c, ast.ClassDef) and any(_dotted(b) == "yaml.SafeLoader" for b in c.bases)
    ] == ["_Loader"]


def test_no_shell_true_in_subprocess_calls():
    shell_calls = []
    subprocess_calls = 0
    for path, tree in _sources("orchestrator"):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name.startswith("subprocess.") or name in {"os.system", "os.popen"}:
                subprocess_calls += 1
                if name in {"os.system", "os.popen"}:
                    shell_calls.append(f"{path}:{node.lineno} {name}")
            shell = _kw(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                shell_calls.append(f"{path}:{node.lineno} shell=")
    assert subprocess_calls >= 1  # the walk sees the git call in tracking/provenance.py
    assert not shell_calls, shell_calls


def test_redact_hides_secret_looking_keys():
    from orchestrator.tracking import redact, redact_text, redact_tree

    params = {
        "tracking.tags.api_key": "k1",
        "db_password": "k2",
        "HF_TOKEN": "k3",
        "my_secret": "k4",
        "aws_access_key_id": "k5",
        "train.lr": "0.001",
        "model.name": "ViT-B-32",
        "tokenizer": "x",
    }
    out = redact(params)
    for key in ("tracking.tags.api_key", "db_password", "HF_TOKEN", "my_secret", "aws_access_key_id"):
        assert out[key] == "***", key
    assert out["train.lr"] == "0.001" and out["model.name"] == "ViT-B-32"
    assert redact_tree({"a": [{"password": "p"}], "b": 1}) == {"a": [{"password": "***"}], "b": 1}
    text = redact_text("config.yaml", "tracking:\n  tags:\n    api_token: s3cr3t\n    team: ir\n")
    assert "s3cr3t" not in text and "team: ir" in text


def test_tiny_run_never_stores_the_secret(tmp_path, monkeypatch):
    """params, tags and the config.yaml artifact of a real (tiny, local) run keep no secret value."""
    import yaml

    from orchestrator.config import validate_config
    from orchestrator.run import run_experiment
    from orchestrator.tracking import client, resolve_target

    secret = "S3CR3T-VALUE-9f2c"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = validate_config(
        {
            "data": {
                "format": "synthetic",
                "synthetic": {"num_train_images": 16, "num_val_images": 8, "num_test_images": 8, "image_size": 16},
            },
            "model": {"name": "itr-tiny-vit"},
            "loss": {"family": "infonce"},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "lr": 1e-3,
                "min_lr": 1e-5,
                "max_steps_per_epoch": 1,
                "eval_at_start": False,
                "output_dir": str(tmp_path / "runs"),
            },
            "eval": {"reports": False},
            "scaling": {"backend": "local"},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_dir": str(tmp_path / "art"),
                "experiment": "sec",
                "tags": {"api_token": secret, "team": "ir"},
            },
        }
    )
    result = run_experiment(cfg, config_source="<test>")
    run = client(resolve_target(cfg.tracking)).get_run(result.run_id)
    assert run.data.tags["team"] == "ir"
    assert run.data.tags["api_token"] == "***"
    assert run.data.params["tracking.tags.api_token"] == "***"
    assert secret not in repr(run.data.params) and secret not in repr(run.data.tags)
    stored = [p for p in (tmp_path / "art").rglob("*") if p.is_file()]
    configs = [p for p in stored if p.name == "config.yaml"]
    assert configs, stored
    assert yaml.safe_load(configs[0].read_text())["tracking"]["tags"] == {"api_token": "***", "team": "ir"}
    for path in stored:
        assert secret.encode() not in path.read_bytes(), path
    assert secret.encode() not in (tmp_path / "mlflow.db").read_bytes()
