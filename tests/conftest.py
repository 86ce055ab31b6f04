"""Test-suite wide fixtures (registered as plugins so every test directory sees them)."""

pytest_plugins = ["tests.fixtures.mlflow_server"]
