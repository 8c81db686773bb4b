from __future__ import annotations

from collections.abc import Iterator

import pytest

import streampickle


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Every async test runs on asyncio, asyncio with uvloop, and trio."""
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _restore_the_pool() -> Iterator[None]:
    """Each test module leaves the process-wide receive pool's bounds and policy as it found
    them (the dask backend sets them when a listener starts; a test may configure them), so
    that no module's result depends on which ran before it."""
    pool = streampickle.buffer_pool
    saved = (pool.max_bytes, pool.max_idle, pool.release_before_map)
    yield
    pool.configure(max_bytes=saved[0], max_idle=saved[1], release_before_map=saved[2])
    pool.keep_for(None)  # no cap on idle memory left from a module's last message
