"""ftattn.onnx.Generator against transformers' generate() on the same weights.

Two decoders of one tiny random Llama (conftest.py): the ``ftattn.onnx.export``
one (position_ids, left padding, ORT-allocated presents) and the genai builder's
fp32 one (GroupQueryAttention, right padding, with and without the shared
past/present buffer).
"""
import json
import os

import numpy as np
import pytest
import torch

from ftattn.onnx import Generator, Padding, SamplingConfig

from onnx_helpers import EOS_ID, PAD_ID, copy_folder

PROMPTS = [
    "def main(args) -> int:",
    "Café",
    "The fault-tolerant attention kernel checks every block of",
]
NEW_TOKENS = 20

# (model kind, Generator.from_pretrained kwargs): every KV-cache path of the loop
KINDS = [
    pytest.param("exported", {}, id="exported"),
    pytest.param("builder", {"shared_buffer": True}, id="builder-shared"),
    pytest.param("builder", {"shared_buffer": True, "direct_binding": False}, id="builder-shared-public-api"),
    pytest.param("builder", {"shared_buffer": False, "threads": 1}, id="builder-unshared-1thread"),
]


_HF_CACHE = {}


def hf_generate(model, tokenizer, prompts, max_new_tokens, **kwargs):
    """transformers' new tokens per prompt, with the pads after an early EOS removed (memoised)."""
    key = (id(model), tuple(prompts), max_new_tokens, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key in _HF_CACHE:
        return _HF_CACHE[key]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=PAD_ID, **kwargs)
    eos = kwargs.get("eos_token_id", EOS_ID)
    eos = {eos} if isinstance(eos, int) else set(eos)
    results = []
    for row in out[:, encoded.input_ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    _HF_CACHE[key] = results
    return results


@pytest.mark.parametrize("kind,options", KINDS)
def test_greedy_single_prompt_matches_transformers(generators, hf_model, hf_tokenizer, kind, options):
    generator = generators(kind, **options)
    for prompt in PROMPTS:
        expected = hf_generate(hf_model, hf_tokenizer, [prompt], NEW_TOKENS)[0]
        result = generator.generate(prompt, NEW_TOKENS)[0]
        assert result.prompt_token_ids == hf_tokenizer(prompt).input_ids
        assert result.token_ids == expected, prompt
        assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("kind,options", KINDS)
def test_greedy_batch_of_different_lengths_matches_transformers(generators, hf_model, hf_tokenizer, kind, options):
    generator = generators(kind, **options)
    assert generator.spec.padding is (Padding.LEFT if kind == "exported" else Padding.RIGHT)
    assert generator.shared_buffer is options.get("shared_buffer", False)
    expected = hf_generate(hf_model, hf_tokenizer, PROMPTS, NEW_TOKENS)
    results = generator.generate(PROMPTS, NEW_TOKENS)
    assert len({len(r.prompt_token_ids) for r in results}) == len(PROMPTS)  # really different lengths
    assert [r.token_ids for r in results] == expected
    # and each row equals the prompt run alone
    assert [generator.generate(p, NEW_TOKENS)[0].token_ids for p in PROMPTS] == expected


@pytest.mark.parametrize("kind,options", KINDS[:2])
def test_eos_stops_like_transformers(generators, hf_model, hf_tokenizer, kind, options):
    generator = generators(kind, **options)
    free = hf_generate(hf_model, hf_tokenizer, PROMPTS, NEW_TOKENS, eos_token_id=[])
    # an EOS id that the first prompt makes at step 5 (and not before), the others maybe never
    eos = next(t for i, t in enumerate(free[0]) if i >= 4 and t not in free[0][:i])
    expected = hf_generate(hf_model, hf_tokenizer, PROMPTS, NEW_TOKENS, eos_token_id=eos)
    results = generator.generate(PROMPTS, NEW_TOKENS, eos_token_id=eos)
    assert [r.token_ids for r in results] == expected
    assert results[0].token_ids[-1] == eos and len(results[0].token_ids) < NEW_TOKENS
    assert results[0].finish_reason == "eos"
    for result in results:
        assert result.finish_reason == ("eos" if result.token_ids[-1] == eos else "length")
    # with the model's own EOS id list (config) nothing changes unless id 1 appears
    assert [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS)] == \
        hf_generate(hf_model, hf_tokenizer, PROMPTS, NEW_TOKENS)


def test_decode_rate_counts_tokens_made(generators, hf_model, hf_tokenizer):
    generator = generators("exported")
    free = hf_generate(hf_model, hf_tokenizer, PROMPTS[:1], NEW_TOKENS, eos_token_id=[])[0]
    eos = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i])
    stopped = generator.generate(PROMPTS[0], NEW_TOKENS, eos_token_id=eos)[0]
    made = len(stopped.token_ids)
    assert made < NEW_TOKENS
    assert stopped.decode_tokens_per_s == pytest.approx((made - 1) / stopped.decode_time_s)
    assert 0 < stopped.time_to_first_token_s
    times = stopped.token_times_s  # one per token made, from the call, non-decreasing
    assert len(times) == made and times == sorted(times)
    assert times[0] == stopped.time_to_first_token_s
    assert times[-1] - times[0] == pytest.approx(stopped.decode_time_s)
    one = generator.generate(PROMPTS[0], 1)[0]
    assert len(one.token_ids) == 1 and one.decode_tokens_per_s == 0.0 and one.finish_reason == "length"
    assert one.token_times_s == [one.time_to_first_token_s]
    batch = generator.generate(PROMPTS, NEW_TOKENS)  # rows of a batch share the step's stamps
    assert all(len(r.token_times_s) == len(r.token_ids) for r in batch)
    longest = max(batch, key=lambda r: len(r.token_ids))
    assert all(r.token_times_s == longest.token_times_s[:len(r.token_ids)] for r in batch)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("kind,options", KINDS[:2])
def test_repetition_penalty_matches_transformers(generators, hf_model, hf_tokenizer, kind, options, penalty):
    generator = generators(kind, **options)
    for prompt in PROMPTS[:2]:
        expected = hf_generate(hf_model, hf_tokenizer, [prompt], NEW_TOKENS, repetition_penalty=penalty)[0]
        assert generator.generate(prompt, NEW_TOKENS, repetition_penalty=penalty)[0].token_ids == expected
    assert expected != hf_generate(hf_model, hf_tokenizer, [prompt], NEW_TOKENS)[0]  # the penalty acts here


@pytest.mark.parametrize("kind,options", KINDS[:2])
def test_seeded_sampling_reproduces(generators, kind, options):
    generator = generators(kind, **options)
    kwargs = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    first = [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS, seed=1234, **kwargs)]
    again = [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS, seed=1234, **kwargs)]
    other = [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS, seed=4321, **kwargs)]
    greedy = [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS)]
    assert first == again
    assert first != other
    assert first != greedy


@pytest.mark.parametrize("kind,options", KINDS[:2])
def test_top_k_1_and_tiny_top_p_equal_greedy(generators, kind, options):
    generator = generators(kind, **options)
    greedy = [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS)]
    top_k = generator.generate(PROMPTS, NEW_TOKENS, do_sample=True, top_k=1, temperature=2.0, seed=0)
    top_p = generator.generate(PROMPTS, NEW_TOKENS, do_sample=True, top_p=1e-9, temperature=2.0, seed=0)
    assert [r.token_ids for r in top_k] == greedy
    assert [r.token_ids for r in top_p] == greedy


@pytest.mark.parametrize("kind,options", KINDS[:2])
def test_streamed_pieces_join_to_text(generators, kind, options):
    generator = generators(kind, **options)
    pieces = {}
    results = generator.generate(PROMPTS, NEW_TOKENS, stream=lambda i, piece: pieces.setdefault(i, []).append(piece))
    for i, result in enumerate(results):
        assert "".join(pieces.get(i, [])) == result.text
        assert result.text == generator.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    # without a stream (or stop strings) the same decoder runs after the loop: same text
    assert [r.text for r in generator.generate(PROMPTS, NEW_TOKENS)] == [r.text for r in results]


def test_stream_waits_for_whole_multibyte_characters(generators):
    generator = generators("exported")
    text = "Café 東京 😀🚀 Zürich"
    ids = generator.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # some characters span several tokens
    row = generator.text.new_row(0, generator.encode("x"))
    pieces = []
    for token in ids:
        generator.text.accept(row, token, 0.0, (), lambda i, piece: pieces.append(piece), set())
    generator.text.flush(row, lambda i, piece: pieces.append(piece), ())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 1
    # no stream: the text is decoded at the end, to the same string
    row = generator.text.new_row(0, generator.encode("x"))
    for token in ids:
        generator.text.accept(row, token, 0.0, (), None, set())
    assert row.emitted == [] and row.pending == ""
    generator.text.flush(row, None, ())
    assert "".join(row.emitted) == text


def test_token_prompt_cut_inside_a_character(generators):
    """A prompt of token ids that ends inside a multi-byte character: the streaming
    decoder must not start from it (the prompt's bytes would enter the text), so the
    text is the new tokens' own decode, as transformers' decode(new tokens)."""
    generator = generators("exported")
    tokenizer = generator.tokenizer
    ids = tokenizer.encode("Zürich 東京 😀", add_special_tokens=False).ids
    cuts = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert cuts  # the tokenizer splits some character across tokens
    for k in cuts:
        pieces = []
        result = generator.generate(ids[:k], 8, eos_token_id=[], stream=lambda i, piece: pieces.append(piece))[0]
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert "".join(pieces) == result.text
        assert generator.generate(ids[:k], 8, eos_token_id=[])[0].text == result.text
    # the priming window: empty after a cut character, shortened when it begins inside one
    # (a literal U+FFFD before the prompt's end leaves it non-empty)
    assert generator.text.new_row(0, ids[:cuts[0]]).prime == []
    ids = tokenizer.encode("東京 😀🚀 Zürich ab", add_special_tokens=False).ids
    starts_inside = next(k for k in range(1, len(ids) - 3) if tokenizer.decode(ids[k:k + 4]).startswith("\ufffd")
                         and not tokenizer.decode(ids[:k + 4]).endswith("\ufffd"))
    prime = generator.text.new_row(0, ids[:starts_inside + 4]).prime
    assert 0 < len(prime) < 4 and prime == ids[starts_inside + 4 - len(prime):starts_inside + 4]
    literal = tokenizer.encode("x\ufffd ok", add_special_tokens=False).ids  # a literal U+FFFD is 3 byte tokens
    prime = generator.text.new_row(0, literal).prime
    assert prime and prime == literal[-len(prime):] and not tokenizer.decode(prime).startswith("\ufffd")


@pytest.mark.parametrize("kind,options", KINDS[:2])
def test_stop_string_cuts_text_and_stream(generators, kind, options):
    generator = generators(kind, **options)
    full = generator.generate(PROMPTS[0], NEW_TOKENS, eos_token_id=[])[0]
    text = full.text
    # a stop string from the middle of the text, spanning a token boundary
    start = len(generator.tokenizer.decode(full.token_ids[:5], skip_special_tokens=True)) - 1
    stop = text[start:start + 3]
    assert len(stop) == 3 and text.find(stop) >= 0
    pieces = []
    result = generator.generate(PROMPTS[0], NEW_TOKENS, eos_token_id=[], stop=["never-made-string", stop],
                                stream=lambda i, piece: pieces.append(piece))[0]
    assert result.finish_reason == "stop"
    assert result.text == text[:text.find(stop)]
    assert "".join(pieces) == result.text
    assert result.token_ids == full.token_ids[:len(result.token_ids)] and len(result.token_ids) < NEW_TOKENS
    # a stop string that never appears changes nothing
    assert generator.generate(PROMPTS[0], NEW_TOKENS, eos_token_id=[], stop="never-made-string")[0].text == text


def test_chat_template_matches_transformers(generators, hf_tokenizer, hf_model):
    generator = generators("exported")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Café?"}]
    expected_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert generator.encode(messages) == list(expected_ids)
    assert generator.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    results = generator.generate([messages, "Café?"], 8)
    assert results[0].prompt_token_ids == list(expected_ids)
    assert results[1].prompt_token_ids == hf_tokenizer("Café?").input_ids


def test_chat_template_filters_as_transformers(generators, hf_tokenizer):
    """transformers' tojson (no HTML or non-ASCII escapes) and strftime_now, which
    current templates use (Llama 3.x dates, tool calls as JSON)."""
    import dataclasses

    generator = generators("exported")
    template = ("{% for m in messages %}{{ m | tojson }}|{{ m['content'] | tojson(indent=2) }}\n{% endfor %}"
                "{{ strftime_now('%Y-%m-%d') }}")
    messages = [{"role": "user", "content": "a<b & 'é' \"東京\""}]
    with_template = Generator(generator.session, dataclasses.replace(generator.spec, chat_template=template),
                              generator.tokenizer)
    assert with_template.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False)


def test_chat_template_from_tokenizer_config_and_missing(exported, tmp_path):
    # older transformers keep the template in tokenizer_config.json instead of chat_template.jinja
    folder = copy_folder(exported, tmp_path / "config_template", skip=("chat_template.jinja",))
    with open(os.path.join(exported, "chat_template.jinja"), encoding="utf-8") as handle:
        template = handle.read()
    config_path = os.path.join(folder, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["chat_template"] = template
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    messages = [{"role": "user", "content": "hi"}]
    with_config = Generator.from_pretrained(folder)
    with_jinja = Generator.from_pretrained(exported)
    assert with_config.encode(messages) == with_jinja.encode(messages)

    bare = copy_folder(exported, tmp_path / "no_template", skip=("chat_template.jinja",))
    with pytest.raises(ValueError, match="no chat_template"):
        Generator.from_pretrained(bare).generate([messages], 4)


def test_threads_providers_and_spinning(exported):
    one = Generator.from_pretrained(exported, threads=1, providers=["CPUExecutionProvider"], allow_spinning=False)
    default = Generator.from_pretrained(exported)
    assert one.session.get_providers() == ["CPUExecutionProvider"]
    assert one.session.get_session_options().intra_op_num_threads == 1
    spinning = "session.intra_op.allow_spinning"
    assert one.session.get_session_options().get_session_config_entry(spinning) == "0"
    assert default.session.get_session_options().get_session_config_entry(spinning) == "1"
    assert [r.token_ids for r in one.generate(PROMPTS, 8)] == [r.token_ids for r in default.generate(PROMPTS, 8)]
    with pytest.raises(TypeError, match="allow_spinning"):
        Generator.from_pretrained(exported, allow_spinning="no")


def test_direct_binding_both_ways(exported, monkeypatch):
    """The per-token binds and runs through onnxruntime's C bindings (default) and
    through its public API give the same tokens; the installed onnxruntime has the
    C bindings, so the default really takes them."""
    from ftattn.onnx import binding as module

    assert module._StepRunner.cpu_device(True) is not None and module._StepRunner.cpu_device(False) is None
    used = []
    real_run = module._StepRunner.run

    def run(self):
        used.append(self.direct)
        return real_run(self)

    monkeypatch.setattr(module._StepRunner, "run", run)
    direct = Generator.from_pretrained(exported, threads=1)
    public = Generator.from_pretrained(exported, threads=1, direct_binding=False)
    assert direct.direct_binding and not public.direct_binding
    tokens = [r.token_ids for r in direct.generate(PROMPTS, 8)]
    assert used and all(used)
    used.clear()
    assert [r.token_ids for r in public.generate(PROMPTS, 8)] == tokens
    assert used and not any(used)
    with pytest.raises(TypeError, match="direct_binding"):
        Generator.from_pretrained(exported, direct_binding=1)


@pytest.mark.parametrize("shared_buffer", [True, False])
def test_decode_mask_binds(generators, hf_model, hf_tokenizer, monkeypatch, shared_buffer):
    """With the shared buffer the decode mask has the buffer's width and is bound once
    (each step writes one 1 per row into it); without, a mask of the step's width is
    bound every step. Same tokens as transformers both ways, single and padded batch."""
    from ftattn.onnx import binding as module

    generator = generators("builder", shared_buffer=shared_buffer)
    binds = []
    real_bind = module._StepRunner.bind_input

    def bind_input(self, name, dtype, shape, address):
        binds.append((name, tuple(shape)))
        return real_bind(self, name, dtype, shape, address)

    monkeypatch.setattr(module._StepRunner, "bind_input", bind_input)
    for prompts in (PROMPTS[:1], PROMPTS):
        binds.clear()
        results = generator.generate(prompts, NEW_TOKENS)
        assert [r.token_ids for r in results] == hf_generate(hf_model, hf_tokenizer, prompts, NEW_TOKENS)
        width = max(len(r.prompt_token_ids) for r in results)
        if shared_buffer:
            assert binds == [("attention_mask", (len(prompts), width + NEW_TOKENS))]
        else:
            assert binds == [("attention_mask", (len(prompts), width + step)) for step in range(1, NEW_TOKENS)]


def test_token_id_prompts(generators):
    generator = generators("exported")
    ids = generator.encode(PROMPTS[0])
    assert generator.generate([ids], 8)[0].token_ids == generator.generate(PROMPTS[0], 8)[0].token_ids
    assert generator.generate(ids, 8)[0].prompt_token_ids == ids


def test_model_without_position_ids_runs_prompts_one_by_one(tiny_hf, tmp_path, hf_model, hf_tokenizer, monkeypatch):
    """An export without position_ids (positions follow the cache length) cannot pad a
    batch: the generator runs prompts of different lengths one at a time, and each
    gives transformers' tokens for that prompt alone."""
    from ftattn.onnx import export

    out = str(tmp_path / "no_positions")
    export(tiny_hf, out, position_ids=False)
    generator = Generator.from_pretrained(out)
    assert generator.spec.position_ids_name is None and generator.spec.padding is Padding.NONE
    runs = []
    real_run = Generator._run
    monkeypatch.setattr(Generator, "_run", lambda self, rows, *a: (runs.append(len(rows)), real_run(self, rows, *a)))
    results = generator.generate(PROMPTS, NEW_TOKENS)
    assert runs == [1] * len(PROMPTS)  # one prompt per run
    expected = [hf_generate(hf_model, hf_tokenizer, [p], NEW_TOKENS)[0] for p in PROMPTS]
    assert [r.token_ids for r in results] == expected
    runs.clear()
    same_length = generator.generate([PROMPTS[0], PROMPTS[0]], NEW_TOKENS)  # equal lengths: one batch
    assert runs == [2] and [r.token_ids for r in same_length] == [expected[0]] * 2


def test_stop_string_in_bytes_left_at_the_end(exported):
    """The bytes the streaming decoder still holds when generation ends (a character never
    completed) come out as the full decode writes them (U+FFFD): a stop string is looked for
    in them too, so the text never holds one."""
    generator = Generator.from_pretrained(exported)
    prompts = ["Café, naïve, Zürich, Ångström, 東", "😀 and", "The fault-tolerant", "東京, 😀 and 🚀"]
    stopped = 0
    for seed in (3, 22):
        for result in generator.generate(prompts, 16, do_sample=True, temperature=1.5, seed=seed, stop=["\ufffd"]):
            assert "\ufffd" not in result.text
            stopped += result.finish_reason == "stop"
    assert stopped
