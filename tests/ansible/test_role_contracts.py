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

from pathlib import Path

import jinja2
import jinja2.meta
import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar

from pyckpt import config

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir())
INVENTORIES = sorted(p.name for p in (REPO / "inventory").iterdir() if (p / "group_vars/all.yml").exists())
# What Ansible itself provides to a role's defaults.
MAGIC = {"groups", "hostvars", "inventory_hostname", "role_path"}
# Optional per-host names a default may read (docs/OPERATIONS.md, "Variables").
HOST_VARS = {"gloo_socket_ifname"}


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


@pytest.mark.parametrize("role", ROLES)
def test_defaults_and_the_main_spec_name_the_same_variables(role):
    in_defaults, in_spec = set(defaults(role)), set(entry_points(role)["main"])
    assert in_defaults - in_spec == set(), f"roles/{role}: in defaults/main.yml but not in argument_specs"
    assert in_spec - in_defaults == set(), f"roles/{role}: in argument_specs but not in defaults/main.yml"


@pytest.mark.parametrize("role", ROLES)
def test_every_spec_states_the_default_the_role_uses(role):
    values = defaults(role)
    wrong = {f"{entry}.{name}": (option.get("default"), values.get(name, "<not in defaults>"))
             for entry, options in entry_points(role).items() for name, option in options.items()
             if option.get("default") != values.get(name, "<not in defaults>")}
    assert wrong == {}, f"roles/{role}: argument_specs default != defaults/main.yml value"


@pytest.mark.parametrize("inventory", [None, *INVENTORIES], ids=lambda i: i or "standalone")
@pytest.mark.parametrize("role", ROLES)
def test_defaults_pass_the_role_spec(role, inventory):
    values = resolved_defaults(role, inventory)
    for entry, options in entry_points(role).items():
        result = ArgumentSpecValidator(options).validate({name: values[name] for name in options})
        assert result.error_messages == [], f"roles/{role} ({entry}) with inventory {inventory}"


def test_no_playbook_sets_a_role_variable():
    # Role variables come from the role's defaults (which read the cluster-wide names) or from the
    # user (inventory, -e). A play that set them would outrank the user's group_vars.
    prefixes = tuple(f"{role}_" for role in ROLES)
    found = []
    for path in sorted([*REPO.glob("*.yml"), *(REPO / "playbooks").glob("*.yml")]):
        for play in load(path):
            role_vars = [role.get("vars", {}) for role in play.get("roles", []) if isinstance(role, dict)]
            files = [load(path.parent / name) for name in play.get("vars_files", [])]
            for names in (play.get("vars", {}), *role_vars, *files):
                found += [f"{path.relative_to(REPO)}: {name}" for name in names if name.startswith(prefixes)]
    assert found == []


@pytest.mark.parametrize("role", ROLES)
def test_defaults_read_only_names_that_exist(role):
    own = set(defaults(role))
    shared = set(load(REPO / "inventory/physical/group_vars/all.yml"))
    facts = facts_set_by(REPO / "playbooks/tasks/cluster-facts.yml")
    unknown = names_read(defaults(role)) - own - shared - facts - MAGIC - HOST_VARS
    assert unknown == set(), (f"roles/{role} reads {sorted(unknown)}: neither a cluster-wide name "
                              "(inventory/physical/group_vars/all.yml), a fact of playbooks/tasks/cluster-facts.yml, "
                              "nor one of the role's own variables")


def test_preflight_allows_what_pyckpt_accepts():
    play = load(REPO / "playbooks/preflight.yml")[0]
    allowed = {name: set(values) for name, values in play["vars"]["preflight_allowed"].items()}
    assert allowed == {"distributed_mode": set(config.MODES), "backend": set(config.BACKENDS),
                       "shared_fs_type": set(config.FS_TYPES)}
    checks = [check for task in play["tasks"] for check in task.get("ansible.builtin.assert", {}).get("that", [])]
    for name in allowed:
        assert f"{name} in preflight_allowed.{name}" in checks, f"preflight does not check {name}"


@pytest.mark.parametrize("role, option, allowed", [
    ("cluster_config", "cluster_config_distributed_mode", config.MODES),
    ("cluster_config", "cluster_config_backend", config.BACKENDS),
    ("cluster_config", "cluster_config_shared_fs_type", config.FS_TYPES),
    ("training", "training_distributed_mode", config.MODES),
])
def test_role_choices_are_what_pyckpt_accepts(role, option, allowed):
    assert set(entry_points(role)["main"][option]["choices"]) == set(allowed)


def test_cluster_config_passes_through_what_pyckpt_passes_through():
    role_vars = load(REPO / "roles/cluster_config/vars/main.yml")
    assert tuple(role_vars["cluster_config_passthrough_prefixes"]) == config.PASSTHROUGH_PREFIXES
