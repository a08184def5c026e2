"""Reliability tests: crash consistency, corruption, hostile snapshots, bad config, concurrency, disk."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: tests/reliability (crash, corruption, hostile input)")
