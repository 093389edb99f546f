"""Model folder loading: what the generation loop needs to know about a decoder.

A model folder holds one ONNX decoder (``model.onnx`` or the file named in
``genai_config.json``), its ``tokenizer.json`` and ``genai_config.json`` (the
onnxruntime-genai model builder) or ``config.json`` (a Hugging Face / optimum
export). The input and output names, the KV-cache layout and the element types
are read from the onnxruntime session; the configs only fill in what a session
cannot tell (symbolic head size, EOS and pad ids, context length).

Two layouts are supported, both with ``past_key_values.{i}.key/value`` inputs and
``present.{i}.key/value`` outputs of shape (batch, kv_heads, sequence, head_size):

- GroupQueryAttention models (the builder's): no ``position_ids``; GQA derives
  each row's position from the attention mask's row sum, so prompts are padded on
  the right, and past and present can share one preallocated buffer.
- Models with ``position_ids`` (optimum, ``ftattn.onnx.export``): prompts are
  padded on the left and positions count only the real tokens, as in
  transformers' ``generate()``.
"""
from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

# onnx tensor type strings as onnxruntime reports them -> numpy dtypes
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}

# optimum and the builder both use these; genai_config.json may override them
_PAST_PATTERN = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_FORMAT = "present.{layer}.{kind}"
# optimum's merged decoders (decoder_model_merged.onnx) pick their branch with this input:
# False for the first pass (an empty past), True once the cache holds tokens
_USE_CACHE_BRANCH = "use_cache_branch"
# which element types each input or output may have
_INTEGER_TYPES = ("tensor(int64)", "tensor(int32)")
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


class Padding(enum.Enum):
    """Where pad tokens go in a batch of prompts of different lengths."""

    LEFT = "left"  # position_ids models: positions skip the pads
    RIGHT = "right"  # GroupQueryAttention models: positions come from mask row sums
    NONE = "none"  # neither: positions would count the pads, so prompts run one by one


@dataclass
class ModelSpec:
    """Everything the generation loop reads from a model folder."""

    folder: str
    decoder_path: str
    tokenizer_path: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    # names, in layer order
    past_key_names: list[str] = field(default_factory=list)
    past_value_names: list[str] = field(default_factory=list)
    present_key_names: list[str] = field(default_factory=list)
    present_value_names: list[str] = field(default_factory=list)
    input_ids_name: str = "input_ids"
    attention_mask_name: str | None = "attention_mask"
    position_ids_name: str | None = None
    use_cache_branch_name: str | None = None
    logits_name: str = "logits"
    # element types
    kv_dtype: type = np.float32
    logits_dtype: type = np.float32
    input_ids_dtype: type = np.int64
    mask_dtype: type = np.int64
    position_ids_dtype: type = np.int64
    group_query_attention: bool = False
    # genai builder's sliding window: its size; whether the graph applies it (GQA's
    # local_window_size: the builder's, or the one the loader set, see read_decoder_graph);
    # whether windowed layers keep a window-sized ring buffer (GQA sliding_window_cache=1,
    # which needs a buffer of at least the window)
    sliding_window: int | None = None
    sliding_window_in_graph: bool = False
    sliding_window_set_by_loader: bool = False
    ring_past_names: frozenset = frozenset()  # past inputs of the GQA nodes that keep a ring
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @property
    def padding(self) -> Padding:
        if self.group_query_attention:
            return Padding.RIGHT
        if self.position_ids_name is not None:
            return Padding.LEFT
        return Padding.NONE

    @property
    def sliding_window_ring(self) -> bool:
        """Some layers keep a window-sized ring (GQA sliding_window_cache=1)."""
        return bool(self.ring_past_names)

    def kv_capacity(self, name: str, request: int) -> int:
        """Positions of the preallocated buffer for the past input ``name`` when a request can
        reach ``request`` positions: the window for a ring (GQA needs at least the window,
        and evicts within it), the request for the others."""
        return self.sliding_window if name in self.ring_past_names else request

    @property
    def shared_buffer(self) -> bool:
        """Past and present can be one preallocated buffer (GQA writes in place)."""
        return self.group_query_attention


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix the file or write it again (the exporter "
                         f"or the genai builder writes it)") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not an object; fix the file or write "
                         f"it again")
    return value


def _section(config: dict | None, path: str, *keys: str) -> dict:
    """config[keys[0]][keys[1]]... ({} where absent or null); a value that is not an object raises."""
    for depth, key in enumerate(keys):
        value = (config or {}).get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {'.'.join(keys[:depth + 1])} is {value!r:.60}, not an object; fix the file "
                             f"or write it again")
        config = value
    return config or {}


def _integer(value, path: str, key: str, minimum: int = 0) -> int:
    """A config's integer (a float with no fraction too), or an error naming the file and key."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{path}: {key} is {value!r:.60}; it must be an integer >= {minimum}")
    return value


# config.json spells some facts differently per model family (GPT-2's n_positions, n_head...)
_CONFIG_ALIASES = {
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                                "seq_length"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "head_dim": ("head_dim", "kv_channels"),
}


def _config_value(config: dict | None, key: str):
    """A config.json fact under any of its spellings, in the config or its text_config."""
    text = (config or {}).get("text_config")
    for scope in (config or {}, text if isinstance(text, dict) else {}):
        for name in _CONFIG_ALIASES.get(key, (key,)):
            if scope.get(name) is not None:
                return scope[name]
    return None


def _as_ids(value, path: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(_integer(v, path, key) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _genai_config(folder: str) -> dict | None:
    genai_path = os.path.join(folder, "genai_config.json")
    return _read_json(genai_path) if os.path.isfile(genai_path) else None


def find_decoder(folder: str) -> str:
    """Path of the folder's ONNX decoder (genai_config.json's name, else model.onnx or the only .onnx)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder; pass the folder holding the .onnx decoder, "
                                f"tokenizer.json and genai_config.json or config.json")
    genai = _genai_config(folder)
    if genai is not None:
        filename = _section(genai, os.path.join(folder, "genai_config.json"), "model", "decoder").get("filename")
        if filename:
            path = os.path.join(folder, filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{folder}: genai_config.json names the decoder {filename!r}, which is not in the "
                    f"folder; copy it there or fix model.decoder.filename")
            return path
    candidates = sorted(f for f in os.listdir(folder) if f.endswith(".onnx"))
    for preferred in ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
        if preferred in candidates:
            return os.path.join(folder, preferred)
    if len(candidates) == 1:
        return os.path.join(folder, candidates[0])
    if not candidates:
        raise FileNotFoundError(
            f"{folder}: no .onnx decoder in the folder; export one with ftattn.onnx.export(hf_dir, "
            f"out_dir) or onnxruntime-genai's builder (python -m onnxruntime_genai.models.builder)")
    raise FileNotFoundError(
        f"{folder}: several .onnx files ({', '.join(candidates)}) and none is model.onnx; rename the "
        f"decoder to model.onnx or name it in genai_config.json (model.decoder.filename)")


def _chat_template(folder: str) -> str | None:
    # transformers 5 writes the template to its own file; older ones into tokenizer_config.json
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as handle:
            return handle.read()
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        template = _read_json(config_path).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template
    return None


def _token_string(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by older transformers
        return value.get("content")
    return value


@dataclass
class DecoderGraph:
    """What the loader reads from the decoder's graph (without its external weights).

    group_query_attention: its attention is com.microsoft GroupQueryAttention;
    window: the largest local_window_size its GQA nodes apply (0: none);
    ring_past_names: the past inputs of the GQA nodes that keep a window-sized ring
    (sliding_window_cache=1);
    window_set: a window the graph did not apply and the loader set on every GQA node
    (0: none), with the edited graph in ``model_bytes`` to load instead of the file.

    The builder gives a layer a window only where the Hugging Face config's
    ``layer_types`` marks it "sliding_attention"; a config with ``sliding_window`` and no
    ``layer_types`` (Mistral, Phi-3, Starcoder2) gets full attention in every layer and
    the window in genai_config.json with no layers, which onnxruntime-genai 0.18 then
    does not apply either. Transformers applies such a window in every layer, so the
    loader sets it there.
    """

    group_query_attention: bool = False
    window: int = 0
    ring_past_names: frozenset = frozenset()
    window_set: int = 0
    model_bytes: bytes | None = None
    float16: bool = False  # some graph input or output is float16


def read_decoder_graph(folder: str, decoder_path: str) -> DecoderGraph:
    """The decoder's attention facts, and the graph with a config-only window applied."""
    import onnx

    try:
        model = onnx.load(decoder_path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and others
        raise ValueError(f"{decoder_path}: not an ONNX model that onnx can read ({type(exc).__name__}: "
                         f"{str(exc)[:300]}); export the model again") from exc
    nodes = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    attributes = [{a.name: a for a in node.attribute} for node in nodes]
    windows = [a["local_window_size"].i for a in attributes if "local_window_size" in a]
    # GQA's inputs: query, key, value, past_key, past_value, ...
    ring = frozenset(name for node, a in zip(nodes, attributes)
                     if "sliding_window_cache" in a and a["sliding_window_cache"].i for name in node.input[3:5])
    float16 = any(value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
                  for value in list(model.graph.input) + list(model.graph.output))
    graph = DecoderGraph(group_query_attention=bool(nodes), window=max([w for w in windows if w > 0], default=0),
                         ring_past_names=ring, float16=float16)
    genai_path = os.path.join(folder, "genai_config.json")
    genai = _genai_config(folder)
    window_cfg = _section(genai, genai_path, "model", "decoder", "sliding_window")
    window = _integer(window_cfg.get("window_size") or 0, genai_path, "model.decoder.sliding_window.window_size")
    context = _section(genai, genai_path, "model").get("context_length") or 0
    context = _integer(context, genai_path, "model.context_length")
    # a window that reaches the whole context is no window
    if nodes and not graph.window and not window_cfg.get("layers") and 0 < window and (not context or window < context):
        for node, attrs in zip(nodes, attributes):
            if "local_window_size" in attrs:
                attrs["local_window_size"].i = window
            else:
                node.attribute.append(onnx.helper.make_attribute("local_window_size", window))
        graph.window, graph.window_set, graph.model_bytes = window, window, model.SerializeToString()
    return graph


def _kv_names(folder: str, inputs: dict, outputs: dict, in_names: dict, out_names: dict):
    """(past names per layer {"key", "value"}, present key names, present value names):
    genai_config's formats when given, else the optimum pattern."""
    past_layers: dict[int, dict[str, str]] = {}
    key_format = in_names.get("past_key_names")
    value_format = in_names.get("past_value_names")
    for name in inputs:
        match = _PAST_PATTERN.match(name)
        if match:
            past_layers.setdefault(int(match.group(1)), {})[match.group(2)] = name
    if key_format and value_format:
        past_layers = {}
        layer = 0
        while key_format % layer in inputs and value_format % layer in inputs:
            past_layers[layer] = {"key": key_format % layer, "value": value_format % layer}
            layer += 1
    if not past_layers:
        raise ValueError(
            f"{folder}: the decoder has no KV-cache inputs (past_key_values.{{i}}.key/value); its inputs "
            f"are {sorted(inputs)}. Export it with the cache (ftattn.onnx.export, optimum's "
            f"'text-generation-with-past' task or the genai builder)")
    num_layers = len(past_layers)
    if sorted(past_layers) != list(range(num_layers)) or any(len(v) != 2 for v in past_layers.values()):
        raise ValueError(f"{folder}: KV-cache inputs are incomplete: {past_layers}; every layer needs a key "
                         f"and a value input")
    present_key_format = out_names.get("present_key_names")
    present_value_format = out_names.get("present_value_names")
    present_keys, present_values = [], []
    for layer in range(num_layers):
        key = present_key_format % layer if present_key_format else _PRESENT_FORMAT.format(layer=layer, kind="key")
        value = (present_value_format % layer if present_value_format
                 else _PRESENT_FORMAT.format(layer=layer, kind="value"))
        for name in (key, value):
            if name not in outputs:
                raise ValueError(f"{folder}: the decoder has no output {name!r} for layer {layer}'s KV "
                                 f"cache (outputs: {sorted(outputs)})")
        present_keys.append(key)
        present_values.append(value)
    return past_layers, present_keys, present_values


def _kv_shape(folder: str, past_shape, decoder_cfg: dict, config: dict | None, genai_path: str,
              config_path: str) -> tuple[int, int]:
    """(KV heads, head size): the session's shape where it is a number, else the configs."""
    cfg_heads = decoder_cfg.get("num_attention_heads") or _config_value(config, "num_attention_heads")
    cfg_kv_heads = decoder_cfg.get("num_key_value_heads") or _config_value(config, "num_key_value_heads") \
        or cfg_heads
    cfg_head_size = decoder_cfg.get("head_size") or _config_value(config, "head_dim")
    hidden_size = _config_value(config, "hidden_size")
    for key, value in (("num_attention_heads", cfg_heads), ("num_key_value_heads", cfg_kv_heads),
                       ("head_size", cfg_head_size), ("hidden_size", hidden_size)):
        if value is not None:  # (0: not given)
            _integer(value, genai_path if decoder_cfg.get(key) else config_path, key)
    if not cfg_head_size and cfg_heads and hidden_size:
        cfg_head_size = hidden_size // cfg_heads
    num_kv_heads = past_shape[1] if isinstance(past_shape[1], int) else cfg_kv_heads
    head_size = past_shape[3] if isinstance(past_shape[3], int) else cfg_head_size
    if not num_kv_heads or not head_size:
        raise ValueError(f"{folder}: cannot tell the KV heads / head size: the session's past shape is "
                         f"{past_shape} and the configs do not give num_key_value_heads / head_size")
    return int(num_kv_heads), int(head_size)


def _context_length(folder: str, model_cfg: dict, config: dict | None, genai_path: str, config_path: str) -> int:
    context_length = model_cfg.get("context_length") or _config_value(config, "max_position_embeddings")
    if not context_length:
        raise ValueError(f"{folder}: no context length (genai_config model.context_length or config.json "
                         f"max_position_embeddings); add one to the config")
    context_length = _integer(context_length, genai_path if model_cfg.get("context_length") else config_path,
                              "the context length", minimum=1)
    return int(context_length)


def _special_tokens(folder: str, genai: dict | None, model_cfg: dict, config: dict | None, genai_path: str,
                    config_path: str) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id): genai_config, generation_config.json, config.json, in that order."""
    eos = _as_ids(model_cfg.get("eos_token_id"), genai_path, "model.eos_token_id") if genai else ()
    generation_path = os.path.join(folder, "generation_config.json")
    if not eos and os.path.isfile(generation_path):
        eos = _as_ids(_read_json(generation_path).get("eos_token_id"), generation_path, "eos_token_id")
    if not eos and config:
        eos = _as_ids(_config_value(config, "eos_token_id"), config_path, "eos_token_id")
    pad = model_cfg.get("pad_token_id") if genai else None
    pad_path = genai_path
    if pad is None and config:
        pad, pad_path = _config_value(config, "pad_token_id"), config_path
    if pad is None:
        pad = eos[0] if eos else 0
    if isinstance(pad, (list, tuple)) and pad:
        pad = pad[0]
    pad = _integer(pad, pad_path, "pad_token_id")
    return eos, pad


def _check_feeds(folder: str, inputs: dict, outputs: dict, input_ids_name: str, mask_name: str, position_name: str,
                 logits_name: str, past_layers: dict) -> None:
    """Every input must be one the loop feeds (another one would fail at the first run),
    with a type the loop feeds."""
    known = {input_ids_name, mask_name, position_name, _USE_CACHE_BRANCH}
    known.update(name for layer in past_layers.values() for name in layer.values())
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise ValueError(
            f"{folder}: the decoder has inputs the generator does not know how to feed: {unknown}; it feeds "
            f"input_ids, attention_mask, position_ids, past_key_values.{{i}}.key/value and optimum's "
            f"use_cache_branch. Export the model with ftattn.onnx.export or the genai builder")
    typed = [(input_ids_name, inputs, _INTEGER_TYPES), (logits_name, outputs, _FLOAT_TYPES),
             (past_layers[0]["key"], inputs, _FLOAT_TYPES)]
    typed += [(name, inputs, _INTEGER_TYPES) for name in (mask_name, position_name) if name in inputs]
    typed += [(_USE_CACHE_BRANCH, inputs, ("tensor(bool)",))] if _USE_CACHE_BRANCH in inputs else []
    for name, where, supported in typed:
        if where[name].type not in supported:
            raise ValueError(f"{folder}: the decoder's {name!r} is {where[name].type}; the generator supports "
                             f"{', '.join(supported)} there")



def _sliding_window(folder: str, graph: DecoderGraph, decoder_cfg: dict, context_length: int) -> int:
    graph_window = graph.window
    # the window: the graph's when its GQA nodes apply one (the builder's or the loader's), else
    # genai_config's, which the graph then does not apply (no GQA nodes to set it on)
    config_window = (decoder_cfg.get("sliding_window") or {}).get("window_size") or 0
    sliding_window = graph_window or (config_window if 0 < config_window < int(context_length) else 0)
    if graph_window and graph_window > int(context_length):
        raise ValueError(
            f"{folder}: the decoder's GroupQueryAttention applies a window of {graph_window} tokens, more than "
            f"its context length {context_length}; onnxruntime needs a KV buffer of at least the window and "
            f"rotary caches as long as the buffer, so no request can run; rebuild the model with a context "
            f"length of at least the window")
    return int(sliding_window or 0)


def load_spec(folder: str, decoder_path: str, session, graph: DecoderGraph | None = None) -> ModelSpec:
    """Read a model folder's configs and the session's inputs/outputs into a ModelSpec.

    ``session`` is an ``onnxruntime.InferenceSession`` on ``decoder_path`` (or on
    ``graph.model_bytes``, the graph with the window the loader set; ``graph``: the
    folder's ``read_decoder_graph``, read here when None).
    """
    config_path = os.path.join(folder, "config.json")
    genai = _genai_config(folder)
    config = _read_json(config_path) if os.path.isfile(config_path) else None
    if genai is None and config is None:
        raise FileNotFoundError(
            f"{folder}: neither genai_config.json nor config.json; the generator needs one for head "
            f"sizes and EOS ids (ftattn.onnx.export and the genai builder both write one)")

    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}

    genai_path = os.path.join(folder, "genai_config.json")
    model_cfg = _section(genai, genai_path, "model")
    decoder_cfg = _section(genai, genai_path, "model", "decoder")
    in_names = _section(genai, genai_path, "model", "decoder", "inputs")
    out_names = _section(genai, genai_path, "model", "decoder", "outputs")
    input_ids_name = in_names.get("input_ids", "input_ids")
    mask_name = in_names.get("attention_mask", "attention_mask")
    position_name = in_names.get("position_ids", "position_ids")
    logits_name = out_names.get("logits", "logits")
    for needed, where, kind in ((input_ids_name, inputs, "input"), (logits_name, outputs, "output")):
        if needed not in where:
            raise ValueError(
                f"{folder}: the decoder has no {kind} {needed!r} (it has {sorted(where)}); the generator "
                f"supports decoders with input_ids -> logits and a KV cache (optimum or genai layout)")

    past_layers, present_keys, present_values = _kv_names(folder, inputs, outputs, in_names, out_names)
    num_layers = len(past_layers)
    num_kv_heads, head_size = _kv_shape(folder, inputs[past_layers[0]["key"]].shape, decoder_cfg, config, genai_path,
                                        config_path)
    context_length = _context_length(folder, model_cfg, config, genai_path, config_path)
    eos, pad = _special_tokens(folder, genai, model_cfg, config, genai_path, config_path)
    _check_feeds(folder, inputs, outputs, input_ids_name, mask_name, position_name, logits_name, past_layers)

    tokenizer_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json; save the model's fast tokenizer there "
            f"(AutoTokenizer.from_pretrained(hf_dir).save_pretrained(folder))")
    tokenizer_config_path = os.path.join(folder, "tokenizer_config.json")
    tokenizer_config = _read_json(tokenizer_config_path) if os.path.isfile(tokenizer_config_path) else {}

    if graph is None:
        graph = read_decoder_graph(folder, decoder_path)
    sliding_window = _sliding_window(folder, graph, decoder_cfg, context_length)
    graph_window = graph.window
    return ModelSpec(
        folder=folder,
        decoder_path=decoder_path,
        tokenizer_path=tokenizer_path,
        num_layers=num_layers,
        num_kv_heads=int(num_kv_heads),
        head_size=int(head_size),
        context_length=int(context_length),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        past_key_names=[past_layers[i]["key"] for i in range(num_layers)],
        past_value_names=[past_layers[i]["value"] for i in range(num_layers)],
        present_key_names=present_keys,
        present_value_names=present_values,
        input_ids_name=input_ids_name,
        attention_mask_name=mask_name if mask_name in inputs else None,
        position_ids_name=position_name if position_name in inputs else None,
        use_cache_branch_name=_USE_CACHE_BRANCH if _USE_CACHE_BRANCH in inputs else None,
        logits_name=logits_name,
        kv_dtype=_ORT_TO_NUMPY[inputs[past_layers[0]["key"]].type],
        logits_dtype=_ORT_TO_NUMPY[outputs[logits_name].type],
        input_ids_dtype=_ORT_TO_NUMPY[inputs[input_ids_name].type],
        mask_dtype=_ORT_TO_NUMPY[inputs[mask_name].type] if mask_name in inputs else np.int64,
        position_ids_dtype=_ORT_TO_NUMPY[inputs[position_name].type] if position_name in inputs else np.int64,
        group_query_attention=graph.group_query_attention,
        sliding_window=int(sliding_window) if sliding_window else None,
        sliding_window_in_graph=bool(graph_window),
        ring_past_names=graph.ring_past_names,
        sliding_window_set_by_loader=bool(graph.window_set),
        chat_template=_chat_template(folder),
        bos_token=_token_string(tokenizer_config.get("bos_token")),
        eos_token=_token_string(tokenizer_config.get("eos_token")),
    )
