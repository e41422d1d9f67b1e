"""KV capacity arithmetic: ``cachesvc capacity`` reproduces the seed's example, and the engine
sizes its pool with the same function."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cachesvc.cli import app
from gpu_prefix.capacity import device_plan, kv_bytes_per_token, parse_bytes, pool_plan
from gpu_prefix.errors import InvalidParamsError


class TestArithmetic:
    def test_a_7b_model_keeps_half_a_mebibyte_of_kv_per_token(self):
        assert kv_bytes_per_token(layers=32, kv_heads=32, head_dim=128, dtype_bytes=2) == 2**19

    def test_the_seeds_example_fits_twenty_sessions_of_a_thousand_tokens_and_sixteen_under_the_watermark(  # noqa: E501 - a behaviour sentence
            self):
        plan = device_plan(layers=32, kv_heads=32, head_dim=128, dtype_bytes=2,
                           device_bytes=24 * 2**30,
                           weights_bytes=14 * 2**30)
        assert plan.pool_tokens == 20480
        assert plan.sessions(1000) == (20, 16)

    def test_a_session_rounds_up_to_whole_blocks(self):
        plan = pool_plan(kv_bytes_per_token=1, pool_bytes=160, block_size=16, high_watermark=1.0)
        assert plan.num_blocks == 10 and plan.sessions(17) == (5, 5) and plan.sessions(16) == (
            10, 10)

    def test_weights_larger_than_the_device_are_refused_naming_the_fix(self):
        with pytest.raises(InvalidParamsError, match=r"device_memory.*larger device"):
            device_plan(layers=1, kv_heads=1, head_dim=1, dtype_bytes=2, device_bytes=10,
                        weights_bytes=20)

    @pytest.mark.parametrize(("text", "expected"), [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9),
                                                    ("512 MiB", 512 * 2**20), ("1e3", 1000),
                                                    ("7", 7)])
    def test_sizes_read_in_decimal_and_binary_units(self, text, expected):
        assert parse_bytes(text, field="x") == expected

    @pytest.mark.parametrize("text", ["lots", "-1GB", "5XB", ""])
    def test_unreadable_sizes_are_refused_naming_the_field(self, text):
        with pytest.raises(InvalidParamsError, match="--device-memory"):
            parse_bytes(text, field="--device-memory")

    def test_the_engine_sizes_its_pool_with_the_same_plan(self, make_engine):
        engine = make_engine(pool_bytes=3 * 2**20 + 5, high_watermark=0.5)
        plan = pool_plan(kv_bytes_per_token=engine.shape.bytes_per_token(),
                         pool_bytes=3 * 2**20 + 5,
                         high_watermark=0.5)
        assert engine.pool.num_blocks == plan.num_blocks
        assert engine.stats().limit_blocks == plan.admit_blocks


class TestCli:
    def test_capacity_prints_the_seeds_example(self):
        out = CliRunner().invoke(app,
                                 ["capacity", "--model", "llama-2-7b", "--device-memory", "24GiB",
                                       "--weights", "14GiB"])
        assert out.exit_code == 0, out.output
        assert "0.5 MiB of KV per token" in out.output
        assert "sessions of 1000 tokens: 20 fit (16 under the watermark)" in out.output

    def test_capacity_reads_a_transformers_config_and_answers_json(self, tmp_path):
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                   "num_key_value_heads": 3,
                                   "hidden_size": 576}))
        out = CliRunner().invoke(app,
                                 ["capacity", "--config", str(cfg), "--kv-dtype", "float32",
                                  "--pool",
                                       "256MiB", "--session-tokens", "1000", "--json"])
        assert out.exit_code == 0, out.output
        data = json.loads(out.output)
        assert data["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4
        assert data["sessions"]["1000"]["fit"] == data["num_blocks"] // 63

    def test_an_unknown_model_is_refused_with_the_known_ones(self):
        out = CliRunner().invoke(app, ["capacity", "--model", "gpt-9", "--device-memory", "24GB"])
        assert out.exit_code == 2 and "llama-2-7b" in out.output

    def test_int8_kv_holds_almost_twice_a_float16_pool_its_scales_taking_the_rest(self):
        def tokens(dtype: str) -> int:
            out = CliRunner().invoke(app,
                                     ["capacity", "--model", "smollm2", "--kv-dtype", dtype,
                                      "--pool",
                                           "64MiB", "--json"])
            return json.loads(out.output)["pool_tokens"]
        # smollm2: per KV head and 16-token block, 2 x 16 x 64 code bytes + 64 K scales + 16 V
        # scales of 2 bytes = 2208 bytes, against 4096 in float16.
        assert tokens("int8") == pytest.approx(tokens("float16") * 4096 / 2208, rel=0.01)

    def test_capacity_and_an_int8_engine_agree_on_blocks_and_bytes(self, make_engine):
        engine = make_engine(kv_dtype="int8", pool_bytes=3 * 2**20)
        out = CliRunner().invoke(app,
                                 ["capacity", "--model", "random-tiny", "--kv-dtype", "int8",
                                  "--scale-dtype",
                                       "float32", "--pool", str(3 * 2**20), "--json"])
        data = json.loads(out.output)
        pool = engine.pool
        assert data["block_bytes"] == pool.block_bytes == pool.quant.nbytes // pool.num_blocks
        assert data["num_blocks"] == pool.num_blocks
        assert data["admit_blocks"] == engine.stats().limit_blocks
        engine.close()
