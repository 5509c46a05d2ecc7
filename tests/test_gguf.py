"""GGUF model sources: a real GGUF file, written with the gguf package's own writer in
llama.cpp's layout (tensor names, q/k permutation, byte-level BPE vocabulary as metadata),
read back by transformers and turned into a plain Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import gguf  # the dev extra installs it (and the gguf extra, for users)
import numpy as np
import pytest
import torch

from drift_engine.cli import cli
from drift_engine.errors import ConfigError
from drift_engine.models.gguf import SOURCE_FILE, convert_gguf, find_gguf_file
from drift_engine.models.sources import resolve_model_source

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "the secret number is seven. guess again, the number is higher than three."


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert script interleaves the rotary halves of q and k per head
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, seed: int = 0):
    """A 2-layer Llama (GQA, untied head) and its tokenizer as one GGUF file; returns both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _bpe_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"], bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: CONTROL, 1: NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight",
            _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], config.num_attention_heads),
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight",
            _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], config.num_key_value_heads),
        )
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


def test_converted_folder_is_the_same_model_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tokenizer = tiny_gguf
    out = convert_gguf(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM refuses quant_method gguf
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_key_value_heads == 2 and not loaded.config.tie_word_embeddings
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert loaded_tok.eos_token == "<|im_end|>"
    assert loaded_tok.pad_token_id == model.config.pad_token_id
    prompt = loaded_tok.apply_chat_template(
        [{"role": "user", "content": "guess"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")

    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded(ids).logits
    # F32 tensors round-trip exactly; the q/k un-permutation is exact too
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_resolve_converts_once_and_caches(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    monkeypatch.setenv("DRIFT_ENGINE_CACHE", str(tmp_path / "cache"))
    first = Path(resolve_model_source(path))
    assert (tmp_path / "cache") in first.parents
    stamp = (first / SOURCE_FILE).stat().st_mtime_ns
    assert resolve_model_source(str(path)) == str(first)
    assert (first / SOURCE_FILE).stat().st_mtime_ns == stamp
    # a folder whose only model file is the GGUF resolves to the same conversion
    assert resolve_model_source(path.parent) == str(first)
    with pytest.raises(ConfigError, match="already exists"):
        convert_gguf(path, first)


def test_gguf_and_checkpoint_folders_through_the_commands(tiny_gguf, tmp_path, monkeypatch):
    """rollout from the GGUF file, train on its rollouts with the GGUF as --model, eval the
    checkpoint folder (not its model/ export) against the GGUF: every command takes both."""
    from click.testing import CliRunner

    from drift_engine.assets import asset_path
    from drift_engine.data.rollouts import load_rollouts

    path, _, _ = tiny_gguf
    monkeypatch.setenv("DRIFT_ENGINE_CACHE", str(tmp_path / "cache"))
    problems = str(asset_path("guess-problems/train.jsonl"))
    runner = CliRunner()
    rollouts = tmp_path / "rollouts.safetensors"
    common = ["--env", "guess", "--problems", problems, "--limit", "2", "--max-turns", "2",
              "--max-new-tokens", "6", "--no-progress"]  # fmt: skip
    result = runner.invoke(
        cli, ["rollout", "--model", str(path), "--n", "2", "--out", str(rollouts), *common]
    )
    assert result.exit_code == 0, result.output
    assert load_rollouts(rollouts).num_trajectories == 4

    run = tmp_path / "run"
    result = runner.invoke(
        cli,
        ["train", "--data", str(rollouts), "--model", str(path), "--out", str(run),
         "--max-steps", "1", "--batch-tokens", "512", "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = next(run.glob("checkpoint-*"))
    assert resolve_model_source(checkpoint) == str(checkpoint / "model")

    result = runner.invoke(
        cli,
        ["eval", "--model", str(path), "--model", str(checkpoint), "--label", "gguf",
         "--label", "trained", "--out", str(tmp_path / "eval"), *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "gguf" in result.output and "trained" in result.output


def test_non_gguf_sources_pass_through(tmp_path):
    assert resolve_model_source("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "extra.gguf").write_bytes(b"")
    assert find_gguf_file(hf) is None  # config.json makes it a Hugging Face folder


def test_gguf_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        find_gguf_file(tmp_path / "missing.gguf")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="several GGUF files"):
        find_gguf_file(tmp_path)
    bad = tmp_path / "bad" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="cannot read GGUF model"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
