"""GGUF loading: a tiny llama written with the gguf package (llama.cpp's q/k row permutation
included) loads to the same parameters as the safetensors checkpoint it came from."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from longctx_jax.weights import ModelLoadError, load_hf, open_model

import reference_llama as ref
from test_model import _hf_config


def _permute_like_llama_cpp(w, heads):
    """llama.cpp's convert script: interleave the rotary halves of each head's rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_vocab():
    """GPT-2's byte-to-unicode alphabet: a 256-token byte-level BPE vocabulary, no merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_gguf(path, hf, weights, qtype):
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_rope_freq_base(hf["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    tokens = (_byte_vocab() + [f"<|special{i}|>" for i in range(hf["vocab_size"] - 256)])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    w.add_token_merges([])
    w.add_eos_token_id(256)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for name, array in weights.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            target = f"blk.{i}.{per_layer[rest]}"
            if rest == "self_attn.q_proj.weight":
                array = _permute_like_llama_cpp(array, hf["num_attention_heads"])
            if rest == "self_attn.k_proj.weight":
                array = _permute_like_llama_cpp(array, hf["num_key_value_heads"])
        else:
            target = names[name]
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(array.astype(np.float32), qtype)
            w.add_tensor(target, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(target, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype, tol", [("F32", 1e-7), ("F16", 1e-3), ("Q8_0", 1e-2),
                                        ("Q4_1", 7e-2)])
def test_gguf_matches_safetensors(tmp_path, qtype, tol):
    import gguf

    hf = _hf_config(hq=6, hkv=2)
    hf.update(vocab_size=260, intermediate_size=64)  # quantized rows come in blocks of 32
    weights = ref.random_checkpoint(np.random.default_rng(3), hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file(weights, str(tmp_path / "model.safetensors"))
    _, want = load_hf(tmp_path)
    path = tmp_path / f"tiny-{qtype}.gguf"
    _write_gguf(path, hf, weights, gguf.GGMLQuantizationType[qtype])
    model = open_model(str(path)).load()
    assert model.config.num_kv_heads == 2 and not model.config.tie_embeddings
    flat_want = dict(_leaves(want))
    for key, got in _leaves(model.params):
        scale = float(np.max(np.abs(flat_want[key])))
        np.testing.assert_allclose(got, flat_want[key], atol=tol * scale, err_msg=key)
    text = "Hello, GGUF!\n"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree, np.float32)


def test_gguf_missing_tensor_is_a_clear_error(tmp_path):
    import gguf

    hf = _hf_config()
    hf["vocab_size"] = 260
    weights = ref.random_checkpoint(np.random.default_rng(4), hf)
    del weights["model.layers.0.mlp.up_proj.weight"]
    path = tmp_path / "broken.gguf"
    _write_gguf(path, hf, weights, gguf.GGMLQuantizationType.F32)
    with pytest.raises(ModelLoadError, match="blk.0.ffn_up.weight"):
        open_model(str(path)).load()
