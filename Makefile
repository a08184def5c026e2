# One entry point for people and CI. `make demo` and `make test` are the README's quickstart.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup setup-containers setup-docker setup-ceph demo test lint pytest clean

setup:                ## controller venv: pyckpt (editable), torch CPU wheel, ansible, molecule, test tools
	bash scripts/setup-venv.sh

setup-containers:     ## podman + runc + the Debian image the Molecule scenarios and the local cluster use
	bash tests/images/setup-podman.sh
	bash tests/images/build-image.sh

setup-docker: setup-containers  ## docker engine (started if none runs) + the same image, for local_cluster_engine=docker
	bash tests/images/setup-docker.sh

setup-ceph:           ## ceph-mon, ceph-osd, radosgw (apt, as root): the real S3 server of bench/cephrgw.py
	bash scripts/setup-ceph.sh

demo: setup           ## single mode: train.py with snapshots, an interruption, a resume
	bash scripts/demo-single.sh

lint: setup
	yamllint -s .
	ansible-lint --profile production

# tests/e2e runs beside the container-free tests, then beside tests/molecule (three scenarios at a time,
# MOLECULE_JOBS): scripts/run-tests.sh says why. `$(PY) -m pytest tests` still runs everything in one session.
pytest: setup setup-containers setup-docker setup-ceph
	PY=$(PY) bash scripts/run-tests.sh

test: lint pytest     ## everything CI runs

clean:
	rm -rf runs .pytest_cache
