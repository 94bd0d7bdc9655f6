"""The serving path's coalescing (issue 18 part 4) through a real Serve app (tiny model): a reader
slower than the engine gets several engine steps' deltas merged into one item, whose tokens, text and
exit layers are those of the deltas read one by one; the replica counts what it merged."""
import asyncio

import pytest

from cluster.engine.protocol import EngineRequest
from cluster.sampling import SamplingParams
from deployments.coalesce import Coalesced

pytestmark = [pytest.mark.timeout(240)]

APP = "coalesce"
TOKENS = 24


@pytest.fixture(scope="module")
def llm(ray_session, tiny_model_dir):
    from ray import serve

    from deployments.testing import deploy

    deploy({"model": tiny_model_dir, "served_model_name": "tiny", "replica_num_cpus": 0.05,
            "ingress_num_cpus": 0.05, "num_blocks": 64}, APP)
    yield serve.get_deployment_handle("LLMServer", app_name=APP)
    serve.delete(APP)


def request(rid: str) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=[1, 2, 3, 4, 5],
                         sampling_params=SamplingParams(max_tokens=TOKENS, ignore_eos=True))


async def read_slowly(handle, rid: str, pause_s: float) -> tuple[list, Coalesced]:
    reader = Coalesced(handle.options(stream=True).generate.remote(request(rid)))
    items = [await reader.__anext__()]
    await asyncio.sleep(pause_s)  # the engine runs on: TOKENS tiny-model steps take far less
    async for item in reader:
        items.append(item)
    await reader.aclose()
    return items, reader


async def read_all(handle, rid: str) -> list:
    return [item async for item in handle.options(stream=True).generate.remote(request(rid))]


def test_slow_reader_gets_several_steps_in_one_item(llm):
    items, reader = asyncio.run(read_slowly(llm, "slow", 3.0))
    fast = asyncio.run(read_all(llm, "fast"))
    assert all(not isinstance(i, BaseException) for i in items + fast)
    assert items[-1].finished and items[-1].finish_reason == "length"
    assert len(items) < len(fast)
    assert len(items[1].new_token_ids) > 1  # several steps' tokens in the one item read after the pause
    assert reader.num_deltas > reader.num_items == len(items)
    # the merge loses nothing: same tokens, text, exit layers and totals as the per-step items
    assert [t for i in items for t in i.new_token_ids] == [t for i in fast for t in i.new_token_ids]
    assert len([t for i in items for t in i.new_token_ids]) == TOKENS == items[-1].num_output_tokens
    assert "".join(i.new_text for i in items) == "".join(i.new_text for i in fast)
    assert [x for i in items for x in i.new_exit_layers] == [x for i in fast for x in i.new_exit_layers]
    assert items[0].replica and items[0].replica == fast[0].replica


def test_replica_counts_items_and_deltas(llm):
    before = llm.stats.remote().result()
    fast = asyncio.run(read_all(llm, "counted"))
    after = llm.stats.remote().result()
    items = after["num_stream_items"] - before["num_stream_items"]
    deltas = after["num_stream_deltas"] - before["num_stream_deltas"]
    assert items == len(fast) and 1 <= items <= deltas <= TOKENS
