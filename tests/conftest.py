"""Shared fixtures: a real moto S3 endpoint, a real mlflow server, a local Ray."""

pytest_plugins = [
    "tests.fixtures.mlflow_server",
    "tests.fixtures.s3",
    "tests.fixtures.s3_faults",
    "tests.fixtures.ray_local",
    "tests.fixtures.ray_head",
]
