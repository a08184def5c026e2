"""The roles' contracts, read from the files: no hosts, no containers.

- Every role's `defaults/main.yml` and `meta/argument_specs.yml` name the same variables with the same
  defaults, and the defaults pass the specs (types, choices) as Ansible checks them when the role
  starts: standalone and with each shipped inventory's group_vars.
- One convention for the cluster-wide names: the roles' defaults read them (`<role>_<knob>:
  "{{ <name> | default(...) }}"`); no playbook sets a role's variables, and every name a default
  reads exists (a typo would silently fall back to the literal default).
- The values preflight allows for pyckpt's config keys, and the roles' choices for them, are
  pyckpt's own (pyckpt/config.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jinja2
import jinja2.meta
import yaml

from pyckpt import config

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir())
INVENTORIES = sorted(p.name for p in (REPO / "inventory").iterdir() if (p / "group_vars/all.yml").exists())
# What Ansible itself provides to a role's defaults.
MAGIC = {"groups", "hostvars", "inventory_hostname", "role_path"}
# Optional per-host names a default may read (docs/OPERATIONS.md, "Variables").
HOST_VARS = {"gloo_socket_ifname", "nccl_socket_ifname"}


def load(path: Path):
    return yaml.safe_load(path.read_text()) or {}


def defaults(role: str) -> dict:
    return load(REPO / "roles" / role / "defaults/main.yml")


def entry_points(role: str) -> dict[str, dict]:
    """Entry point name -> its options, from meta/argument_specs.yml."""
    specs = load(REPO / "roles" / role / "meta/argument_specs.yml")["argument_specs"]
    return {name: entry.get("options") or {} for name, entry in specs.items()}


def resolved_defaults(role: str, inventory: str | None) -> dict:
    """The role's defaults templated by Ansible, under the inventory's group_vars when one is named."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    loader = DataLoader()
    variables = loader.load_from_file(str(REPO / "roles" / role / "defaults/main.yml"), trusted_as_template=True)
    if inventory:  # group_vars outrank role defaults
        variables = {**variables, **loader.load_from_file(str(REPO / "inventory" / inventory / "group_vars/all.yml"),
                                                          trusted_as_template=True)}
    templar = Templar(loader=loader, variables={**variables, "groups": {}, "inventory_hostname": "localhost",
                                                "role_path": str(REPO / "roles" / role)})
    return {name: templar.template(variables[name]) for name in defaults(role)}


def facts_set_by(tasks_file: Path) -> set[str]:
    return {name for task in load(tasks_file) for name in task.get("ansible.builtin.set_fact", {})}


def names_read(value) -> set[str]:
    """The variables a (possibly nested) YAML value's templates refer to."""
    if isinstance(value, dict):
        return set().union(*map(names_read, value.values()))
    if isinstance(value, list):
        return set().union(*map(names_read, value))
    if isinstance(value, str) and "{{" in value:
        return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(value))
    return set()


def contract_problems(role: str) -> list[str]:
    """How the role's defaults/main.yml and meta/argument_specs.yml disagree."""
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
    values, entries = defaults(role), entry_points(role)
    where = f"roles/{role}"
    problems = [f"{where}: {name} is in defaults/main.yml, not in argument_specs" for name in values
                if name not in entries["main"]]
    problems += [f"{where} ({entry}): {name} is in argument_specs, not in defaults/main.yml"
                 for entry, options in entries.items() for name in options if name not in values]
    problems += [f"{where} ({entry}): {name} default {option.get('default')!r} != {values[name]!r} in defaults/main.yml"
                 for entry, options in entries.items() for name, option in options.items()
                 if name in values and option.get("default") != values[name]]
    if problems:  # the check below needs every option in defaults/main.yml
        return problems
    for inventory in [None, *INVENTORIES]:  # the defaults as Ansible checks them when the role starts
        resolved = resolved_defaults(role, inventory)
        for entry, options in entries.items():
            result = ArgumentSpecValidator(options).validate({name: resolved[name] for name in options})
            problems += [f"{where} ({entry}, inventory {inventory or 'none'}): {error}"
                         for error in result.error_messages]
    return problems


def test_defaults_agree_with_argument_specs():
    # In its own interpreter: importing Ansible patches interpreter internals (sys.intern), which
    # breaks torch (torch._dynamo) imported later by other tests of the same pytest process.
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == []


def test_cluster_wide_names_reach_the_roles_one_way():
    # Role variables come from the role's defaults (which read the cluster-wide names) or from the
    # user (inventory, -e): a play that set them would outrank the user's group_vars.
    prefixes = tuple(f"{role}_" for role in ROLES)
    set_by_plays = []
    for path in sorted([*REPO.glob("*.yml"), *(REPO / "playbooks").glob("*.yml")]):
        for play in load(path):
            role_vars = [role.get("vars", {}) for role in play.get("roles", []) if isinstance(role, dict)]
            files = [load(path.parent / name) for name in play.get("vars_files", [])]
            for names in (play.get("vars", {}), *role_vars, *files):
                set_by_plays += [f"{path.relative_to(REPO)}: {name}" for name in names if name.startswith(prefixes)]
    assert set_by_plays == []
    # A misspelt name in a default would silently fall back to the literal.
    known = (set(load(REPO / "inventory/physical/group_vars/all.yml"))
             | facts_set_by(REPO / "playbooks/tasks/cluster-facts.yml") | MAGIC | HOST_VARS)
    unknown = {role: sorted(names_read(defaults(role)) - set(defaults(role)) - known) for role in ROLES}
    assert {role: names for role, names in unknown.items() if names} == {}, (
        "neither a cluster-wide name (inventory/physical/group_vars/all.yml), a fact of "
        "playbooks/tasks/cluster-facts.yml, nor one of the role's own variables")


def test_allowed_values_are_pyckpt_s():
    play = load(REPO / "playbooks/preflight.yml")[0]
    allowed = {name: set(values) for name, values in play.get("vars", {}).get("preflight_allowed", {}).items()}
    assert allowed == {"distributed_mode": set(config.MODES), "backend": set(config.BACKENDS),
                       "shared_fs_type": set(config.FS_TYPES)}
    checks = [check for task in play["tasks"] for check in task.get("ansible.builtin.assert", {}).get("that", [])]
    assert [name for name in allowed if f"{name} in preflight_allowed.{name}" not in checks] == []
    for role, option, values in [("cluster_config", "cluster_config_distributed_mode", config.MODES),
                                 ("cluster_config", "cluster_config_backend", config.BACKENDS),
                                 ("cluster_config", "cluster_config_shared_fs_type", config.FS_TYPES),
                                 ("training", "training_distributed_mode", config.MODES)]:
        assert set(entry_points(role)["main"][option]["choices"]) == set(values), option
    prefixes = load(REPO / "roles/cluster_config/vars/main.yml")["cluster_config_passthrough_prefixes"]
    assert tuple(prefixes) == config.PASSTHROUGH_PREFIXES


if __name__ == "__main__":
    print(json.dumps([problem for role in ROLES for problem in contract_problems(role)]))
