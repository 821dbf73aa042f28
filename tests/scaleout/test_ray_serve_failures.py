"""`mmedge serve --ray`: a replica that cannot open its copy of a package fails the deployment."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from mmedge.errors import IntegrityError

pytestmark = pytest.mark.ray
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")


def test_a_replica_with_another_package_copy_fails_the_deployment(
    ray_instance: str, tiny_pkg_session: Path
) -> None:
    """Each replica checks its copy against the manifest the driver verified; the driver gets the
    replica's own error, and nothing stays deployed."""
    from ray import serve

    from mmedge.sdk.serve.config import ServeConfig
    from mmedge.sdk.serve.ray_deploy import APP_NAME, application, launch, package_refs

    refs = [dataclasses.replace(r, digest="0" * 64) for r in package_refs([tiny_pkg_session])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        config = ServeConfig(port=s.getsockname()[1])
    try:
        with pytest.raises(IntegrityError, match="not the one the driver verified"):
            launch(application(refs, config, 1, "ort", "auto", 1), config)
        assert APP_NAME not in serve.status().applications
    finally:
        serve.shutdown()
