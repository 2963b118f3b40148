"""The CTranslate2 package and its converted models (engine-free; ``ctranslate2``, ``torch`` and
``transformers`` are imported inside the functions that need them, never when this module loads).

- :func:`available`, :func:`require`, :data:`INSTALL_HINT`: whether the optional extra is installed.
- :func:`supports`: whether a model directory's architecture converts.
- :func:`converted_dir`: the model converted once per (weights digest, quantization, ctranslate2
  version) into ``<cache_root>/ct2/<digest[:16]>-<quantization>-<version>/``, under a file lock
  (the driver and the Python workers of one machine convert it once), built in a temporary
  sibling and renamed into place. A marker (:data:`MARKER`) written last holds the source
  digest and each converted file's sha256; an entry is verified against it before it is reused
  (once per process and file state), and a damaged or partial entry is rebuilt. A changed
  model has another digest, so another entry.

The converter is CTranslate2's ``TransformersConverter``. Its GPT-NeoX loader is written for
transformers 4 (``config.rotary_pct``, ``model.embed_out``); :class:`_NeoXLoader` replaces only its
``get_model_spec`` for transformers 5: rotary dimensions from ``rope_parameters`` (partial rotary
factor x head dimension), the rotary base from ``rope_theta`` (the stock loader leaves CT2's
default 10000), the output projection ``lm_head``. Every other architecture goes through CT2's
own loaders. A directory holding only a LoRA adapter (the train job's ``lora_save: adapter``)
is merged into its base model with peft first; ``lora_save: both|merged`` directories hold the
merged weights themselves and convert directly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

from dollyflow.core.models.files import tokenizer_dir_for
from dollyflow.core.storage import file_lock, remove_dir
from dollyflow.core.tokens import file_sha256

INSTALL_HINT = ("the CTranslate2 engine needs the ctranslate2 package: pip install 'dollyflow[ctranslate2]' "
                "(or set infer.engine=torch)")
MARKER = ".dollyflow-ct2.json"     # written last into a converted entry: source digest, files' sha256
ADAPTER_CONFIG = "adapter_config.json"

_CONVERSIONS = [0]
_VERIFIED: dict[tuple, bool] = {}
_REGISTRY_LOCK = threading.Lock()


def available() -> bool:
    """Whether ``ctranslate2`` can be imported."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """ImportError with :data:`INSTALL_HINT` when ``ctranslate2`` cannot be imported."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def conversions() -> int:
    """How many conversions this process has run (a reused entry does not count)."""
    return _CONVERSIONS[0]


# -- architectures -------------------------------------------------------------------------------


def _rope(config) -> tuple[float, float, str]:
    """(partial rotary factor, rope theta, rope type) of a GPT-NeoX config, transformers 5
    (``rope_parameters``) or 4 (``rotary_pct``, ``rotary_emb_base``)."""
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and rp:
        return (float(rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))),
                float(rp.get("rope_theta", 10000.0)), str(rp.get("rope_type", "default")))
    return (float(getattr(config, "rotary_pct", 1.0)), float(getattr(config, "rotary_emb_base", 10000.0)),
            "default")


def _neox_loader():
    """The GPT-NeoX loader with ``get_model_spec`` fixed for transformers 5 (see module doc)."""
    from ctranslate2.converters.transformers import _SUPPORTED_ACTIVATIONS, GPTNeoXLoader
    from ctranslate2.specs import transformer_spec

    class _NeoXLoader(GPTNeoXLoader):
        def get_model_spec(self, model):
            config = model.config
            factor, theta, kind = _rope(config)
            if kind != "default":
                raise ValueError(f"GPT-NeoX rope_type {kind!r} is not supported by the CTranslate2 conversion")
            heads = config.num_attention_heads
            spec = transformer_spec.TransformerDecoderModelSpec.from_config(
                config.num_hidden_layers, heads, pre_norm=True,
                activation=_SUPPORTED_ACTIVATIONS[config.hidden_act],
                rotary_dim=int(factor * (config.hidden_size // heads)), rotary_interleave=False,
                rotary_base=theta, parallel_residual=config.use_parallel_residual, shared_layer_norm=False)
            self.set_decoder(spec.decoder, model.gpt_neox, heads)
            head = model.get_output_embeddings()     # lm_head (transformers 5), embed_out (4)
            self.set_linear(spec.decoder.projection, head)
            return spec

    return _NeoXLoader()


def _converter(src: str, tokenizer_dir: str):
    """CT2's ``TransformersConverter`` for ``src`` with the fixed GPT-NeoX loader (swapped into
    CT2's loader registry for this conversion only) and the tokenizer from ``tokenizer_dir``."""
    from ctranslate2.converters import transformers as ct2_hf

    class _Converter(ct2_hf.TransformersConverter):
        def _load(self):
            with _REGISTRY_LOCK:
                stock = ct2_hf._MODEL_LOADERS.get("GPTNeoXConfig")
                ct2_hf._MODEL_LOADERS["GPTNeoXConfig"] = _neox_loader()
                try:
                    return super()._load()
                finally:
                    if stock is None:
                        ct2_hf._MODEL_LOADERS.pop("GPTNeoXConfig", None)
                    else:
                        ct2_hf._MODEL_LOADERS["GPTNeoXConfig"] = stock

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return tokenizer_class.from_pretrained(tokenizer_dir, trust_remote_code=False)

    return _Converter(src)


def is_adapter_only(model_dir: str) -> bool:
    """A directory with a peft adapter and no model config of its own (``lora_save: adapter``)."""
    return (os.path.isfile(os.path.join(model_dir, ADAPTER_CONFIG))
            and not os.path.isfile(os.path.join(model_dir, "config.json")))


def _base_of(model_dir: str) -> str:
    with open(os.path.join(model_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{model_dir}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def _source_config(model_dir: str):
    from transformers import AutoConfig
    src = _base_of(model_dir) if is_adapter_only(model_dir) else model_dir
    return AutoConfig.from_pretrained(src, trust_remote_code=False)


def supports(model_dir: str) -> bool:
    """Whether the CTranslate2 converter handles the model's architecture: GPT-NeoX with plain
    rotary embeddings (through the fixed loader) or any configuration CT2 registers a loader
    for. False when ctranslate2 is not installed or the config cannot be read."""
    if not available():
        return False
    try:
        config = _source_config(model_dir)
        from ctranslate2.converters.transformers import _MODEL_LOADERS
    except Exception:
        return False
    name = type(config).__name__
    if name == "GPTNeoXConfig":
        return _rope(config)[2] == "default"
    return name in _MODEL_LOADERS


# -- the conversion cache ------------------------------------------------------------------------




def read_marker(ct2_dir: str) -> dict | None:
    """The marker of a converted entry (None when absent or unreadable)."""
    try:
        with open(os.path.join(ct2_dir, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _verified(target: str, digest: str) -> bool:
    """Whether ``target`` is a complete entry of ``digest``: its marker names the digest and
    every listed file has its recorded sha256 (hashed once per process and file state)."""
    marker = read_marker(target)
    if not marker or marker.get("source_digest") != digest or not isinstance(marker.get("files"), dict):
        return False
    try:
        state = tuple((n, os.stat(os.path.join(target, n)).st_size, os.stat(os.path.join(target, n)).st_mtime_ns)
                      for n in sorted(marker["files"]))
    except OSError:
        return False
    key = (os.path.abspath(target), digest, state)
    if key not in _VERIFIED:
        _VERIFIED[key] = all(file_sha256(os.path.join(target, n)) == sha for n, sha in marker["files"].items())
    return _VERIFIED[key]


def converted_dir(model_dir: str, digest: str, compute_type: str, cache_root: str) -> str:
    """The CTranslate2 copy of ``model_dir`` (weights digest ``digest``, e.g.
    :func:`dollyflow.core.models.files.model_digest`) quantized for ``compute_type``
    (``default``: the weights' own type), converted once into
    ``<cache_root>/ct2/<digest[:16]>-<quantization>-<ctranslate2 version>/`` (see module doc)."""
    require()
    import ctranslate2

    quantization = None if compute_type in (None, "", "default") else str(compute_type)
    name = f"{digest[:16]}-{quantization or 'default'}-{ctranslate2.__version__}"
    root = os.path.join(os.path.abspath(os.path.expanduser(cache_root)), "ct2")
    os.makedirs(root, mode=0o700, exist_ok=True)
    target = os.path.join(root, name)
    if _verified(target, digest):
        return target
    with file_lock(os.path.join(root, f"{name}.lock")):
        if _verified(target, digest):
            return target
        remove_dir(target, under=root)     # a partial or damaged entry of this key
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
        try:
            _convert(model_dir, tmp, quantization, digest, root)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _merge_lora(model_dir: str, out: str) -> None:
    """Merge the adapter of ``model_dir`` into its base model with peft and save the merged model
    (safetensors, the adapter directory's tokenizer and generation config) into ``out``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir_for(model_dir), trust_remote_code=False)
    base = AutoModelForCausalLM.from_pretrained(_base_of(model_dir), dtype="auto", use_safetensors=True,
                                                trust_remote_code=False)
    if base.get_input_embeddings().num_embeddings < len(tok):
        base.resize_token_embeddings(len(tok))
    merged = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen):
        shutil.copyfile(gen, os.path.join(out, "generation_config.json"))


def _eos_ids(src: str) -> list[int]:
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(src).eos_token_id
    except Exception:
        return []
    return [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]


def _convert(model_dir: str, out: str, quantization: str | None, digest: str, root: str) -> None:
    import ctranslate2
    from transformers import AutoConfig, AutoTokenizer

    merged = tempfile.mkdtemp(prefix=".tmp-merge-", dir=root) if is_adapter_only(model_dir) else None
    try:
        src = model_dir
        if merged:
            _merge_lora(model_dir, merged)
            src = merged
        tok_dir = tokenizer_dir_for(model_dir)
        _converter(src, tok_dir).convert(out, quantization=quantization, force=True)
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
        eos = _eos_ids(src)
    finally:
        if merged:
            shutil.rmtree(merged, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    with open(os.path.join(out, "vocabulary.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    n = len(tokenizer)
    if len(vocab) < n or vocab[:n] != tokenizer.convert_ids_to_tokens(list(range(n))):
        raise ValueError(f"the converted vocabulary ({len(vocab)} entries) does not match the tokenizer's {n} "
                         f"tokens id for id: refusing the CTranslate2 copy of {model_dir}")
    files = {}
    for dirpath, _dirs, names in os.walk(out):
        for fname in names:
            path = os.path.join(dirpath, fname)
            files[os.path.relpath(path, out)] = file_sha256(path)
    marker = {"source_digest": digest, "source": os.path.abspath(model_dir), "quantization": quantization or "default",
              "ctranslate2": ctranslate2.__version__, "architecture": type(config).__name__,
              "max_positions": getattr(config, "max_position_embeddings", None), "eos_token_ids": eos,
              "vocabulary_size": len(vocab), "merged_lora": bool(merged), "files": files}
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1, sort_keys=True)
    _CONVERSIONS[0] += 1
