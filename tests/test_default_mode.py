"""An exit config's / server's default mode ``full`` (issue 17 part 5): requests that name no mode run
the full model, requests that name one still get it. The default model ships the mode that measured
fastest (README, "Which early-exit mode by default")."""
from __future__ import annotations

import pytest

from cluster.config import ExitConfig
from tests.test_spec_decode import (GREEDY, NUM_LAYERS, PROMPTS, _restore_threads, exits, full, make_llm,  # noqa: F401
                                    reference, request, run, spec_totals)

pytestmark = pytest.mark.timeout(300)


def test_full_default_runs_the_full_model_and_keeps_every_mode(damped_model_dir, full):
    ref = reference(full, PROMPTS[:3], GREEDY)
    llm = make_llm(damped_model_dir, exits(mode="full", skip_layers=(3, 4, 5)))
    try:
        plain, skip, lossy = run(llm, [request(llm, PROMPTS[0]), request(llm, PROMPTS[1], exit_mode="layer_skip"),
                                       request(llm, PROMPTS[2], exit_mode="paper")])
        assert plain.token_ids == ref[0] and plain.exit_layers == [NUM_LAYERS] * len(ref[0])
        assert plain.num_draft_tokens == 0 and plain.exit_mode is None
        assert skip.token_ids == ref[1] and skip.exit_mode == "layer_skip" and spec_totals([skip])[0] > 0.5
        assert lossy.exit_mode == "paper" and min(lossy.exit_layers) < NUM_LAYERS  # threshold 0.3: exits
        # the shorthand of LLM.generate follows the same default
        assert llm.generate(PROMPTS[0], GREEDY)[0].exit_layers == [NUM_LAYERS] * len(ref[0])
        llm.engine.check_integrity()
    finally:
        llm.shutdown()


def test_full_is_a_default_not_a_request_mode():
    from cluster.cli import build_parser
    from cluster.engine.protocol import EngineRequest
    from deployments.config import ServeArgs
    from pydantic import ValidationError

    assert ExitConfig(mode="full").mode == "full"
    with pytest.raises(ValueError, match="mode must be one of"):
        ExitConfig(mode="fastest")
    assert ServeArgs(exit_mode="full").exit_mode == "full"
    assert build_parser().parse_args(["generate", "hi", "--exit-mode", "full"]).exit_mode == "full"
    with pytest.raises(ValidationError):  # a request turns early exit off with early_exit=False instead
        EngineRequest(request_id="x", prompt_token_ids=[1], exit_mode="full")
