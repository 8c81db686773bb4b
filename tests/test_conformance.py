"""The conformance battery (streampickle.testing) over every binding, on asyncio and trio."""

from __future__ import annotations

import pytest

from _pairs import BINDINGS, reap_processes
from streampickle.testing import CHECKS, check_object_stream


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("binding", BINDINGS)
async def test_conformance(binding: str, check: str) -> None:
    try:
        await check_object_stream(BINDINGS[binding], only=[check])
    finally:
        await reap_processes()
