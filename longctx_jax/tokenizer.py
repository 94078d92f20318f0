"""Byte-level BPE tokenizer from GGUF metadata or an HF ``tokenizer.json``, plus chat templates.

Built on the ``tokenizers`` library so encoding is fast and matches HF exactly; special tokens
(GGUF token type CONTROL) are matched atomically in text, as HF does.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from longctx_jax.errors import LongctxError

# GPT-2's split, and Llama-3's (used by llama.cpp's "llama-bpe" pre-tokenizer).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL = 3  # GGUF token_type of control (special) tokens
_DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                          "<|im_start|>assistant\n{% endif %}")


class Tokenizer:
    """Text <-> token ids. ``encode`` never adds BOS unless asked: SmolLM2 uses none."""

    def __init__(self, backend: _HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 chat_template: str | None, add_bos: bool = False):
        self._tok = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template or _DEFAULT_CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS plus the chat end-of-turn marker if the vocab has one."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            t = self._tok.token_to_id(marker)
            if t is not None:
                ids.add(t)
        return tuple(sorted(ids))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's Jinja chat template (HF's sandbox settings)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise LongctxError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        bos = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self._tok.id_to_token(self.eos_id) if self.eos_id is not None else ""
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos)

    # ------------------------------------------------------------------------- construction

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        """From GGUF ``tokenizer.ggml.*`` metadata (model ``gpt2``: byte-level BPE)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise LongctxError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE "
                               "('gpt2') is supported")
        tokens = list(fields["tokenizer.ggml.tokens"])
        types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = _HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"),
                                               bool(fields.get("tokenizer.ggml.add_space_prefix")))
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL])

        def opt_int(key):
            value = fields.get(key)
            return None if value is None else int(value)

        return cls(backend, bos_id=opt_int("tokenizer.ggml.bos_token_id"),
                   eos_id=opt_int("tokenizer.ggml.eos_token_id"),
                   chat_template=fields.get("tokenizer.chat_template"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, directory: str | pathlib.Path) -> "Tokenizer":
        """From ``tokenizer.json`` (+ ``tokenizer_config.json`` for specials and chat template)."""
        directory = pathlib.Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise LongctxError(f"{directory} has no tokenizer.json")
        backend = _HFTokenizer.from_file(str(path))
        config = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text())

        def token_id(key):
            token = config.get(key)
            if isinstance(token, Mapping):
                token = token.get("content")
            return backend.token_to_id(token) if token else None

        return cls(backend, bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
                   chat_template=config.get("chat_template"),
                   add_bos=bool(config.get("add_bos_token", False)))


def _pre_tokenizer(pre: str, add_prefix_space: bool):
    byte_level = dict(add_prefix_space=add_prefix_space, use_regex=False)
    if pre in ("smollm", "starcoder", "refact"):
        # Digits split one by one, then GPT-2's regex (HF: Digits + ByteLevel(use_regex=True)).
        split = [pre_tokenizers.Digits(individual_digits=True),
                 pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")]
    elif pre in ("default", "gpt2", "gpt-2"):
        split = [pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated")]
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        split = [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated")]
    else:
        raise LongctxError(f"unsupported GGUF pre-tokenizer {pre!r}")
    return pre_tokenizers.Sequence([*split, pre_tokenizers.ByteLevel(**byte_level)])
