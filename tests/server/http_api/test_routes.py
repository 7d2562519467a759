"""Several prompts' generations together: the error of one is the answer, and every
generation is closed first."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.core.errors import OverQuota
from loraplex.server.engine.request import RequestOutput, Usage
from loraplex.server.http_api.routes import complete_all, merged
from loraplex.server.runtime.requests import Generation


def generation(fail_after: int | None, closed: list[str], name: str) -> Generation:
    async def outputs():
        try:
            for i in range(1000):
                await asyncio.sleep(0.001)
                if fail_after is not None and i == fail_after:
                    raise OverQuota("tenant over its limit", 2.0)
                yield RequestOutput("x", [1])
            yield RequestOutput("", [], "length", usage=Usage(1, 1000))
        finally:
            closed.append(name)

    return Generation(name, None, outputs(), _abandon=lambda: None)


@pytest.mark.parametrize("stream", [False, True])
def test_one_failing_prompt_fails_the_request_with_its_own_error(stream):
    closed: list[str] = []
    gens = [generation(None, closed, "long"), generation(3, closed, "failing")]

    async def run() -> None:
        if stream:
            async for _ in merged(gens):
                pass
        else:
            await complete_all(gens)

    with pytest.raises(OverQuota):  # not an internal error (aclose of a running generator)
        asyncio.run(run())
    assert sorted(closed) == ["failing", "long"]
