"""Configuration: defaults < YAML < CLI flags; bad values refused with clear messages."""

import argparse
from pathlib import Path

import pytest

from llamaserve.cli import add_serve_parser, config_options, main
from llamaserve.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, load_config
from llamaserve.engine.workers import interface_toward

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("dtype: bfloat16\nmax_num_seqs: 8\nport: 9000\nkv_cache_gib: 2\n")
    engine, server = load_config(path, max_num_seqs=4, port=None, host="0.0.0.0")
    assert engine.model.dtype == "bfloat16" and engine.cache.kv_cache_gib == 2
    assert engine.scheduler.max_num_seqs == 4  # the flag wins
    assert server.port == 9000 and server.host == "0.0.0.0"  # an unset flag (None) keeps the YAML value
    assert engine.scheduler.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens


def test_llama2_deployment_configs_load():
    engine, _ = load_config(CONFIGS / "llama-2-7b-chat.yaml")
    assert engine.model.model == "meta-llama/Llama-2-7b-chat-hf" and engine.model.chat_template == "llama-2"
    assert engine.scheduler.max_model_len == 4096 and engine.model.dtype == "float16"
    engine, _ = load_config(CONFIGS / "llama-2-70b-chat.yaml")
    assert engine.parallel.tensor_parallel_size == 8


def test_request_limits_come_from_yaml_and_flags(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("max_n: 4\nmax_stop_strings: 2\n")
    _, server = load_config(path, max_stop_strings=3, max_request_body_bytes=1024)
    assert (server.max_n, server.max_stop_strings, server.max_request_body_bytes) == (4, 3, 1024)
    assert server.max_messages == 1024 and server.max_logit_bias == 1024  # defaults
    assert main(["serve", "--max-prompts-per-request", "0"]) == 2


def test_tp_is_short_for_tensor_parallel_size(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("tp: 2\n")
    assert load_config(path)[0].parallel.tensor_parallel_size == 2
    assert load_config(path, tensor_parallel_size=3)[0].parallel.tensor_parallel_size == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "float8"}, "dtype"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"kv_cache_gib": -1}, "kv_cache_gib"),
        ({"policy": "lifo"}, "policy"),
        ({"port": 70000}, "port"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"max_request_body_bytes": 0}, "max_request_body_bytes"),
        ({"max_n": 0}, "max_n"),
        ({"keep_alive_timeout": 0}, "keep_alive_timeout"),
        ({"max_stop_string_length": -1}, "max_stop_string_length"),
        ({"tensor_parallel_size": 3, "nnodes": 2, "master_port": 29500}, "nnodes must be >= 1 and divide"),
        ({"nnodes": 0}, "nnodes"),
        ({"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 2, "master_port": 29500}, r"node_rank must be in 0\.\.1"),
        ({"node_rank": -1}, "node_rank"),
        ({"attention_backend": "flash"}, "attention_backend must be one of auto, torch, triton, flashinfer"),
        ({"tensor_parallel_size": 2, "nnodes": 2}, "master_port must be set when nnodes > 1"),
    ],
)
def test_bad_values_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, **options)


def test_attention_backend_and_enforce_eager_from_yaml_and_flags(tmp_path):
    assert (EngineConfig().model.attention_backend, EngineConfig().model.enforce_eager) == ("auto", False)
    path = tmp_path / "deploy.yaml"
    path.write_text("attention_backend: triton\nenforce_eager: true\n")
    model = load_config(path)[0].model
    assert (model.attention_backend, model.enforce_eager) == ("triton", True)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--attention-backend", "torch", "--enforce-eager"])
    model = load_config(path, **config_options(args))[0].model
    assert (model.attention_backend, model.enforce_eager) == ("torch", True)
    unset = load_config(path, **config_options(parser.parse_args(["serve"])))[0].model
    assert (unset.attention_backend, unset.enforce_eager) == ("triton", True)  # unset flags keep the YAML's


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown engine option 'max_seqs'"):
        EngineConfig.from_options(max_seqs=3)
    assert CacheConfig(block_size=32).block_size == 32


def test_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs must be >= 1" in capsys.readouterr().err


def test_nodes_hold_consecutive_ranks_and_number_their_gpus_from_zero(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("tp: 8\nnnodes: 2\nmaster_addr: 10.0.0.1\nmaster_port: 29500\n")
    parallel = load_config(path, node_rank=1)[0].parallel
    assert (parallel.ranks_per_node, parallel.node_ranks) == (4, range(4, 8))
    assert [parallel.local_rank(r) for r in parallel.node_ranks] == [0, 1, 2, 3]
    assert ParallelConfig(tensor_parallel_size=3).node_ranks == range(3)  # one node: every rank


def test_headless_is_refused_on_node_zero(capsys):
    assert main(["serve", "--headless"]) == 2
    assert "--headless needs --node-rank >= 1" in capsys.readouterr().err
    assert main(["serve", "--tp", "2", "--nnodes", "2", "--node-rank", "1"]) == 2  # no --master-port
    assert "master_port must be set" in capsys.readouterr().err


def test_gloo_binds_to_the_interface_toward_the_master():
    assert interface_toward("127.0.0.1", 29500) == "lo"
