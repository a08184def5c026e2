"""Cluster security defaults, read from the roles themselves (defaults + templates rendered with Jinja2).

Exports limited to the cluster subnet with root squashing unless asked otherwise (roles/nfs_server);
ufw default deny from outside the subnet with SSH kept open (roles/firewall, when that role exists).
The templates are rendered here with the role defaults resolved like Ansible resolves them (a value
may refer to another variable); Molecule scenarios of those roles check the same on real hosts.
"""
from __future__ import annotations

import ipaddress
import os
import re

import jinja2
import pytest
import yaml

pytestmark = pytest.mark.reliability
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ROLES = os.path.join(REPO, "roles")


def _ternary(value, yes, no, none=None):
    return none if value is None and none is not None else (yes if value else no)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             loader=jinja2.FileSystemLoader(ROLES))
    env.filters["ternary"] = _ternary
    env.filters["bool"] = lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
    return env


def role_vars(role: str, overrides: dict | None = None) -> dict:
    """The role's defaults with every "{{ ... }}" resolved (inventory-like overrides win, as in Ansible)."""
    path = os.path.join(ROLES, role, "defaults", "main.yml")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    raw.update(overrides or {})
    env, context = _env(), {"ansible_managed": "managed by Ansible", **raw}

    def resolve(value):
        if isinstance(value, str) and "{{" in value:
            out = env.from_string(value).render(context)
            try:
                parsed = yaml.safe_load(out)
            except yaml.YAMLError:
                return out
            return parsed if isinstance(parsed, (list, dict, bool, int)) else out
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    for _ in range(5):  # values referring to values
        context = {k: resolve(v) for k, v in context.items()}
    return context


def render(role: str, template: str, overrides: dict | None = None) -> str:
    return _env().get_template(f"{role}/templates/{template}").render(role_vars(role, overrides))


def export_clients(exports: str) -> list[tuple[str, list[str]]]:
    out = []
    for line in exports.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            for client, options in re.findall(r"(\S+)\(([^)]*)\)", line):
                out.append((client, options.split(",")))
    return out


needs_nfs_role = pytest.mark.skipif(not os.path.isdir(os.path.join(ROLES, "nfs_server")),
                                    reason="roles/nfs_server is not in the repo")


@needs_nfs_role
@pytest.mark.parametrize("subnet", [None, "10.77.0.0/26"])
def test_kernel_exports_only_the_cluster_subnet_with_root_squash(subnet):
    overrides = {"cluster_subnet": subnet} if subnet else {}
    clients = export_clients(render("nfs_server", "exports.j2", overrides))
    assert clients, "no export line rendered"
    want = subnet or role_vars("nfs_server")["nfs_server_allowed_clients"][0]
    for client, options in clients:
        assert client == want, f"exported to {client}, not only the cluster subnet {want}"
        net = ipaddress.ip_network(client, strict=False)
        assert net.prefixlen >= 8, f"{client} is too wide for a cluster subnet"
        assert "root_squash" in options and "no_root_squash" not in options, options
        assert "insecure" not in options and "rw" in options


@needs_nfs_role
def test_no_root_squash_only_when_asked():
    clients = export_clients(render("nfs_server", "exports.j2", {"nfs_server_root_squash": False}))
    assert all("no_root_squash" in options for _, options in clients)
    ganesha = render("nfs_server", "ganesha-exports.conf.j2", {"nfs_server_root_squash": False})
    assert re.search(r"Squash\s*=\s*no_root_squash;", ganesha)


@needs_nfs_role
def test_ganesha_export_denies_by_default_and_allows_the_subnet():
    conf = render("nfs_server", "ganesha-exports.conf.j2", {"cluster_subnet": "10.77.0.0/26"})
    export_level = re.split(r"\n\s*CLIENT\s*{", conf)[0]
    assert re.search(r"Access_Type\s*=\s*None;", export_level), "the export must grant nothing by default"
    assert re.search(r"Squash\s*=\s*root_squash;", export_level)
    clients = re.findall(r"CLIENT\s*{\s*Clients\s*=\s*([^;]+);\s*Access_Type\s*=\s*(\w+);", conf)
    assert ("10.77.0.0/26", "RW") in clients
    assert all(c in ("10.77.0.0/26", "127.0.0.1") for c, _ in clients), clients
    assert all(access == "RO" for c, access in clients if c == "127.0.0.1")


def test_inventories_keep_the_safe_defaults():
    """No shipped inventory turns root squashing off or exports to everyone."""
    for name in sorted(os.listdir(os.path.join(REPO, "inventory"))):
        for dirpath, _, files in os.walk(os.path.join(REPO, "inventory", name)):
            for f in files:
                if not f.endswith((".yml", ".yaml")):
                    continue
                with open(os.path.join(dirpath, f)) as fh:
                    text = fh.read()
                data = yaml.safe_load(text) or {}
                flat = yaml.safe_dump(data)
                assert "nfs_server_root_squash: false" not in flat, f"{dirpath}/{f} turns root squashing off"
                for subnet in re.findall(r"cluster_subnet:\s*(\S+)", flat):
                    net = ipaddress.ip_network(subnet.strip("'\""), strict=False)
                    assert net.prefixlen >= 8 and net != ipaddress.ip_network("0.0.0.0/0"), f"{f}: {subnet}"


needs_firewall_role = pytest.mark.skipif(not os.path.isdir(os.path.join(ROLES, "firewall")),
                                         reason="roles/firewall is not in the repo")


def firewall_rules(overrides: dict | None = None) -> list[dict]:
    return yaml.safe_load(render("firewall", "rules.yml.j2", overrides))


@needs_firewall_role
def test_ufw_defaults_deny_incoming_and_are_enabled():
    v = role_vars("firewall")
    assert v["firewall_default_incoming"] == "deny"
    assert v["firewall_enabled"] is True


@needs_firewall_role
@pytest.mark.parametrize("subnet", [None, "10.77.0.0/26"])
def test_ufw_allows_only_ssh_from_outside_the_subnet(subnet):
    overrides = {"cluster_subnet": subnet} if subnet else {}
    want = subnet or role_vars("firewall")["firewall_cluster_subnet"]
    rules = firewall_rules(overrides)
    assert rules[0]["port"] == "22" and rules[0]["proto"] == "tcp" and rules[0]["rule"] == "allow", \
        "SSH must be the first rule (ufw is enabled after the rules: the controller is never locked out)"
    for r in rules[1:]:
        assert r["rule"] == "allow" and r["from"] == want, f"{r['key']} is open beyond the cluster subnet {want}"
    assert {(r["port"], r["proto"]) for r in rules} >= {("29500", "tcp"), ("2049", "tcp"), ("111", "tcp")}


@needs_firewall_role
def test_ufw_is_enabled_only_after_rules_and_policies():
    with open(os.path.join(ROLES, "firewall", "tasks", "main.yml")) as f:
        tasks = yaml.safe_load(f)
    ufw = [(i, t["community.general.ufw"]) for i, t in enumerate(tasks) if "community.general.ufw" in t]
    enable = [i for i, args in ufw if "state" in args]
    rules = [i for i, args in ufw if "rule" in args and not args.get("delete")]
    policy = [i for i, args in ufw if "default" in args]
    assert enable and rules and policy
    assert max(rules) < min(enable) and max(policy) < min(enable)
