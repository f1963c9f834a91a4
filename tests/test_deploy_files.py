"""The files under systemd/ and deploy/: valid for their tools, consistent with the code.

External tools (systemd-analyze from Debian's ``systemd``, promtool from Debian's
``prometheus``) are required under CI (``CI=true``: a missing tool fails the test)
and skipped with a reason elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from uffdd import metrics

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "uffdd-dashboard.json"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "uffdd-daemonset.yaml"
CONFIG = ROOT / "deploy" / "uffdd.toml"

#: Syscalls the daemon makes that a seccomp filter could take away.
NEEDED_SYSCALLS = (
    "userfaultfd",
    "ioctl",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_open",
    "pidfd_send_signal",
    "pidfd_getfd",
    "sendmsg",
    "recvmsg",
    "memfd_create",
    "mmap",
    "madvise",
    "eventfd2",
    "epoll_wait",
)
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})


def tool(name: str, package: str) -> str:
    """Return the path of ``name``; fail under CI, skip elsewhere, if it is missing."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (Debian package {package!r})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must install it")
        pytest.skip(reason)
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output as text."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Return {key: [values...]} of a unit file (all sections, comments dropped)."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# --- systemd ---------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    # verify insists that ExecStart= exists; point it at a stand-in executable.
    stub = tmp_path / "uffdd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service = (SYSTEMD / "uffdd.service").read_text()
    assert "ExecStart=/usr/bin/uffdd " in service
    (tmp_path / "uffdd.service").write_text(service.replace("/usr/bin/uffdd", str(stub)))
    shutil.copy(SYSTEMD / "uffdd.socket", tmp_path / "uffdd.socket")
    result = run(
        analyze,
        "verify",
        "--man=no",
        str(tmp_path / "uffdd.service"),
        str(tmp_path / "uffdd.socket"),
    )
    assert result.returncode == 0, result.stderr
    assert "uffdd." not in result.stderr, result.stderr


def test_service_settings() -> None:
    s = unit_settings(SYSTEMD / "uffdd.service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "10s",
        "Restart": "on-failure",
        "FileDescriptorStoreMax": "512",
        "ExecStart": "/usr/bin/uffdd serve --config /etc/uffdd/uffdd.toml",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "uffdd",
        "RuntimeDirectoryPreserve": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert caps == {"CAP_SYS_PTRACE", "CAP_KILL", "CAP_IPC_LOCK"}


def test_socket_settings() -> None:
    s = unit_settings(SYSTEMD / "uffdd.socket")
    assert s["ListenStream"] == ["%t/uffdd/vmm.sock"]
    assert s["FileDescriptorName"] == ["vmm"]
    assert s["SocketMode"] == ["0660"]


def expand_syscall_group(analyze: str, group: str, seen: set[str] | None = None) -> set[str]:
    """Return every syscall in ``group``, following nested @groups."""
    seen = set() if seen is None else seen
    seen.add(group)
    result = run(analyze, "syscall-filter", group)
    assert result.returncode == 0, result.stderr
    calls: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                calls |= expand_syscall_group(analyze, word, seen)
        else:
            calls.add(word)
    return calls


def test_syscall_filter_allows_what_the_daemon_needs() -> None:
    analyze = tool("systemd-analyze", "systemd")
    allowed: set[str] = set()
    for entry in unit_settings(SYSTEMD / "uffdd.service")["SystemCallFilter"]:
        assert not entry.startswith("~"), "a deny list could take a needed call away"
        for word in entry.split():
            allowed |= expand_syscall_group(analyze, word) if word.startswith("@") else {word}
    missing = [call for call in NEEDED_SYSCALLS if call not in allowed]
    assert missing == []


# --- Prometheus ------------------------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", "uffdd-alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "test", "rules", "uffdd-alerts.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_required_cases() -> None:
    text = (PROMETHEUS / "uffdd-alerts.yml").read_text()
    names = set(re.findall(r"^\s*- alert: (\w+)", text, re.MULTILINE))
    required = {
        "UffddDown",
        "UffddMigrationStalled",
        "UffddDemandLatencyHigh",
        "UffddUnrecoverablePages",
    }
    assert required <= names


# --- metric names used by dashboards and alerts ----------------------------------


@pytest.fixture(scope="module")
def exposed() -> Iterator[dict[str, frozenset[str]]]:
    """Return {sample name: label names} of every uffdd series the daemon can export.

    A session with a blocked thread is opened so per-session series exist too.
    """
    session = metrics.SessionMetrics("deploy-files-test", "import")
    session.blocked(1, 0.0)
    names: dict[str, frozenset[str]] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith("uffdd_"):
                labels = frozenset(sample.labels) - {"le"}
                names[sample.name] = names.get(sample.name, frozenset()) | labels
    session.close()
    yield names


_SELECTOR = re.compile(r"\b(uffdd_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def check_expression(expr: str, exposed: dict[str, frozenset[str]]) -> list[str]:
    """Return problems of ``expr``: unknown uffdd metrics or label matchers."""
    problems = []
    for name, selector in _SELECTOR.findall(expr):
        if name not in exposed:
            problems.append(f"unknown metric {name}")
            continue
        allowed = exposed[name] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        for label in _MATCHER.findall(selector or ""):
            if label not in allowed:
                problems.append(f"{name} has no label {label}")
    return problems


def dashboard_expressions() -> list[str]:
    """Return every PromQL expression of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            exprs.append(variable["definition"])
    return exprs


def test_dashboard_loads_and_uses_defined_metrics(exposed: dict[str, frozenset[str]]) -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 10
    problems = [p for expr in exprs for p in check_expression(expr, exposed)]
    assert problems == []
    used = {name for expr in exprs for name, _ in _SELECTOR.findall(expr)}
    assert "uffdd_fault_resolution_seconds_bucket" in used


def test_dashboard_panels_have_unique_ids() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Feed every dashboard query to promtool as a recording rule, Grafana variables filled."""
    promtool = tool("promtool", "prometheus")
    variables = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(e for e in dashboard_expressions() if "label_values" not in e):
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        lines += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run(promtool, "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_defined_metrics(exposed: dict[str, frozenset[str]]) -> None:
    text = (PROMETHEUS / "uffdd-alerts.yml").read_text()
    exprs = re.findall(r"expr: \|\n((?:\s{10}.*\n)+)|expr: (.+)", text)
    joined = [block or line for block, line in exprs]
    assert len(joined) >= 4
    problems = [p for expr in joined for p in check_expression(expr, exposed)]
    assert problems == []


# --- config and Kubernetes -------------------------------------------------------


#: The keys the Kubernetes ConfigMap sets (on top of them: the node's addresses and TLS).
CONFIGMAP_BASE = {
    "api": {
        "socket": "/run/uffdd/vmm.sock",
        "socket_mode": "0660",
        "allowed_uids": [0],
        "allowed_gids": [],
    },
    "peer": {
        "listen": "127.0.0.1:4460",
        "connect_timeout": 5.0,
        "bulk_lanes": 1,
    },
    "metrics": {"listen": "127.0.0.1:9464"},
    "session": {"strategy": "continue-then-populate", "policy": "crash", "deadline": 30.0},
    "limits": {
        "max_sessions": 64,
        "max_frame_bytes": 1048576,
        "max_fds_per_request": 64,
        "max_outstanding_requests": 4096,
        "handshake_timeout": 5.0,
    },
    "log": {"level": "info"},
}


def shipped_defaults() -> dict[str, dict[str, object]]:
    """Every key of config.py's dataclasses at its default, as the shipped file has it:
    peer link on loopback; keys whose default is "unset" (None, and the TLS files "")
    are there commented out, with a production value."""
    from uffdd import config

    defaults = dataclasses.asdict(config.Config())
    defaults["peer"]["listen"] = "127.0.0.1:4460"
    for key in ("ca", "cert", "key"):
        del defaults["peer"][key]
    return {section: {k: v for k, v in keys.items() if v is not None}
            for section, keys in defaults.items()}


def test_default_config_file() -> None:
    """deploy/uffdd.toml documents every key of every section at its default: a key
    added to config.py without a line there fails here."""
    assert tomllib.loads(CONFIG.read_text()) == shipped_defaults()


def test_default_config_file_comments_every_key() -> None:
    """Each key has a comment line right above it (or a run of keys under one comment),
    and a key with no value by default (peer.tls) is there commented out."""
    from uffdd import config

    text = CONFIG.read_text()
    for section in dataclasses.fields(config.Config):
        for key in dataclasses.fields(section.type if isinstance(section.type, type)
                                      else getattr(config, str(section.type))):
            assert re.search(rf"^(# )?{key.name} = ", text, re.MULTILINE), \
                f"{section.name}.{key.name} is missing from {CONFIG.name}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+ = ", line):
            above = next(x for x in reversed(lines[:i]) if not re.match(r"^\w+ = ", x))
            assert above.startswith("#"), f"{line!r} has no comment above it"


def test_default_config_loads_with_the_daemon_loader() -> None:
    from uffdd import config

    # The shipped file is the defaults, with the peer link on loopback.
    expected = dataclasses.replace(
        config.Config(), peer=dataclasses.replace(config.PeerConfig(), listen="127.0.0.1:4460"))
    assert config.load(str(CONFIG)) == expected


def test_default_config_starts_without_certificates() -> None:
    """The shipped file passes the start-up check of the peer link (plaintext only on
    loopback), and its commented TLS lines are the ones a production host sets."""
    from uffdd import config
    from uffdd.config import check_peer_security

    check_peer_security(config.load(str(CONFIG)).peer, "peer link")
    text = CONFIG.read_text()
    for key in ("ca", "cert", "key"):
        assert f'# {key} = "/etc/uffdd/tls/' in text, key


def configmap_toml(text: str) -> str:
    """Return the ``uffdd.toml: |`` block of the ConfigMap, de-indented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "uffdd.toml: |")
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    block = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line[indent:])
    return "\n".join(block) + "\n"


def test_daemonset_manifest() -> None:
    text = DAEMONSET.read_text()
    assert "\t" not in text, "YAML must not contain tabs"
    kinds = re.findall(r"^kind: (\w+)$", text, re.MULTILINE)
    assert kinds == ["Namespace", "ConfigMap", "DaemonSet"]
    for needle in (
        "hostNetwork: true",
        "hostPID: true",
        "path: /run/uffdd",
        "path: /dev/userfaultfd",
        "containerPort: 9464",
        "containerPort: 4460",
        'add: ["SYS_PTRACE", "KILL", "IPC_LOCK"]',
        'drop: ["ALL"]',
    ):
        assert needle in text, needle
    # The ConfigMap is the default config with the peer link and metrics on the node's
    # addresses, and the node's TLS files.
    peer = {**CONFIGMAP_BASE["peer"], "listen": "0.0.0.0:4460", "ca": "/etc/uffdd/tls/ca.pem",
            "cert": "/etc/uffdd/tls/uffdd.pem", "key": "/etc/uffdd/tls/uffdd.key"}
    expected = {**CONFIGMAP_BASE, "peer": peer, "metrics": {"listen": "0.0.0.0:9464"}}
    assert tomllib.loads(configmap_toml(text)) == expected


def test_daemonset_parses_as_yaml() -> None:
    import yaml  # a test dependency (pyproject test extras): required, never skipped
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"peer": 4460, "metrics": 9464}
    paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert paths == {"/run/uffdd", "/dev/userfaultfd"}


# --- MemoryDenyWriteExecute=yes must not break the daemon ------------------------

MDWE_CHILD = """
import ctypes, importlib, json, pkgutil, sys
import uffdd
if sys.argv[1] == "mdwe":
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print(json.dumps({"unsupported": ctypes.get_errno()}))
        sys.exit(0)
failed = []
for module in pkgutil.walk_packages(uffdd.__path__, "uffdd."):
    if module.name.endswith("__main__"):  # importing it runs the CLI
        continue
    try:
        importlib.import_module(module.name)
    except Exception as e:
        failed.append(f"{module.name}: {type(e).__name__}")
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
print(json.dumps({"failed": sorted(failed), "callback": callback(41)}))
"""


def test_memory_deny_write_execute_keeps_the_daemon_working() -> None:
    """The unit sets MemoryDenyWriteExecute=yes; PR_SET_MDWE enforces the same rule."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def child(mode: str) -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, "-c", MDWE_CHILD, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        report: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
        return report

    protected = child("mdwe")
    if "unsupported" in protected:
        pytest.skip(f"PR_SET_MDWE not supported by this kernel (errno {protected['unsupported']})")
    assert protected["callback"] == 42
    # Modules that fail to import without the rule are not this test's business.
    assert protected["failed"] == child("plain")["failed"]
