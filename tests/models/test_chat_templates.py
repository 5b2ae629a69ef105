"""Chat templates of public model families, rendered by qkv and by transformers' ``apply_chat_template``:
the text must be byte-identical and the token ids identical, on conversations of many shapes.

The templates in ``chat_templates/`` are real ones (vLLM's examples folder and a Qwen3 checkpoint's
template); the tokenizers are tiny byte-level BPEs trained offline whose added tokens are the
template's markers, so the comparison needs no network.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import cache
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the oracle is transformers: pip install -e '.[test]'")
jinja2 = pytest.importorskip("jinja2", reason="chat templates need jinja2 >= 3.1.6 (a qkv dependency)")

from qkv.models.chat import ChatTemplate
from qkv.pretrained import Tokenizer

HERE = Path(__file__).parent / "chat_templates"

# per template: its special tokens (as tokenizer attributes) and the other markers it writes
FAMILIES = {
    "chatml": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"]),
    "qwen3": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
               "</tool_response>"]),
    "hermes": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"},
               ["<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "llama3.1_json": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                      ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral_tools": ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                      ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                       "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "gemma3_pythonic": ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
                        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]),
    "phi4_mini": ({"eos_token": "<|end|>"}, ["<|system|>", "<|user|>", "<|assistant|>"]),
    "deepseekv3": ({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
                   ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                    "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
                    "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]),
    "alpaca": ({"bos_token": "<s>", "eos_token": "</s>"}, []),
}
NAMES = sorted(FAMILIES)
CORPUS = ["hello there, how are you today?", "what is the weather in Paris", "the weather is sunny and warm",
          "system prompt: you are a helpful assistant", "call the tool get_weather with a city"] * 10

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
        "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
SYS = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "What is the weather in Paris?"}
A1 = {"role": "assistant", "content": "It is sunny and 21 °C."}
U2 = {"role": "user", "content": "And tomorrow?"}
TRICKY = ("Ünïcödé 日本語 — emoji 🙂👍🏽, braces {{ not_a_var }} {% if x %}jinja{% endif %} {#c#} "
          "json {\"a\": [1, 2]} <b>&amp;</b> 'quotes' \"double\" \\ backslash\ttab\n  indented  ")

# name -> (messages, template variables); every case runs with add_generation_prompt False and True
CASES = {
    "single_user": ([U1], {}),
    "system_user": ([SYS, U1], {}),
    "multi_turn": ([SYS, U1, A1, U2], {}),
    "no_system_multi_turn": ([U1, A1, U2], {}),
    "ends_with_assistant": ([U1, A1], {}),
    "tricky_text": ([{"role": "system", "content": TRICKY}, {"role": "user", "content": TRICKY},
                     {"role": "assistant", "content": TRICKY}, {"role": "user", "content": "ok"}], {}),
    "special_token_text_in_content": ([{"role": "user", "content": "say <|im_end|> and </s> and <eos>"}], {}),
    "text_blocks": ([{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                  {"type": "text", "text": "there"}]}], {}),
    "system_text_blocks": ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], {}),
    "tools_question": ([SYS, U1], {"tools": [WEATHER]}),
    "tools_no_system": ([U1], {"tools": [WEATHER]}),
    "tool_call_and_result": ([U1, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                              {"role": "tool", "name": "get_weather", "tool_call_id": "call_1",
                               "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"},
                              {"role": "assistant", "content": "It is 21 degrees and sunny."}],
                             {"tools": [WEATHER]}),
    "tool_call_string_arguments": ([U1, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny"}], {"tools": [WEATHER]}),
    "content_none": ([U1, {"role": "assistant", "content": None}], {}),
    "reasoning_content": ([U1, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Check weather."},
                           U2], {}),
    "reasoning_last": ([U1, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Think first."}], {}),
    "thinking_alias": ([U1, {"role": "assistant", "content": "Sunny.", "thinking": "Hmm, weather."}], {}),
    "inline_think": ([U1, {"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nSunny."}], {}),
    "enable_thinking_false": ([U1], {"enable_thinking": False}),
    "enable_thinking_true": ([U1], {"enable_thinking": True}),
    "override_special_tokens": ([U1, A1], {"bos_token": "<BOS>", "eos_token": "<EOS>"}),
    "date_string": ([SYS, U1], {"date_string": "26 Jul 2024", "tools": [WEATHER]}),
    "documents": ([U1], {"documents": [{"title": "Paris", "text": "Paris is in France."}]}),
    "roles_not_alternating": ([U1, U2], {}),
    "two_tool_calls": ([U1, {"role": "assistant", "tool_calls": [CALL, CALL]}], {"tools": [WEATHER]}),
}
# conversations ending with a message to continue: (messages, continue_final_message, variables)
CONTINUE = {
    "continue_content": ([SYS, U1, {"role": "assistant", "content": "The weather is"}], True, {}),
    "continue_trailing_space": ([U1, {"role": "assistant", "content": "The weather is "}], True, {}),
    "continue_blocks": ([U1, {"role": "assistant", "content": [{"type": "text", "text": "It is"}]}], True, {}),
    "continue_reasoning": ([U1, {"role": "assistant", "content": "", "reasoning_content": "First, the"}],
                           "reasoning_content", {}),
    "continue_user": ([U1], True, {}),
    "continue_tuple_blocks": ([U1, {"role": "assistant", "content": ({"type": "text", "text": "Sure,"},)}], True, {}),
}


@cache
def _backend(name: str):
    """A tiny byte-level BPE whose added tokens are the template's markers (special ones flagged)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Tok

    specials, markers = FAMILIES[name]
    tok = Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=list(dict.fromkeys(
        specials.values())), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    return tok


def _hf(name: str, template=None):
    specials, _ = FAMILIES[name]
    source = (HERE / f"{name}.jinja").read_text(encoding="utf-8") if template is None else template
    return transformers.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(_backend(name)),
                                                chat_template=source, **specials)


_FOLDERS: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _folders_root(tmp_path_factory):
    _FOLDERS.clear()
    _FOLDERS["."] = tmp_path_factory.mktemp("chat-tokenizers")
    yield
    _FOLDERS.clear()


def _folder(name: str) -> Path:
    """The folder ``save_pretrained`` writes for this family's tokenizer (tokenizer.json, config, template)."""
    if name not in _FOLDERS:
        _FOLDERS[name] = _FOLDERS["."] / name
        _hf(name).save_pretrained(_FOLDERS[name])
    return _FOLDERS[name]


def _outcome(fn):
    """('ok', value) or ('error', exception)."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 -- compared below
        return "error", e


def _same_failure(ref: Exception, fn):
    """transformers raised ``ref``: qkv must raise too, a template's own error as ValueError with its message."""
    if isinstance(ref, jinja2.exceptions.TemplateError):
        with pytest.raises(ValueError) as info:
            fn()
        if not isinstance(ref, jinja2.exceptions.SecurityError):
            assert str(ref) in str(info.value)
    else:
        with pytest.raises(type(ref)):
            fn()


def _compare(name, messages, add_generation_prompt=False, continue_final_message=False, **variables):
    hf = _hf(name)
    ref_kind, ref = _outcome(lambda: hf.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, **copy.deepcopy(variables)))
    template = ChatTemplate((HERE / f"{name}.jinja").read_text(encoding="utf-8"), special_tokens=hf.special_tokens_map)
    before = copy.deepcopy(messages)

    def ours():
        return template.render(messages, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, **variables)

    if ref_kind == "error":
        _same_failure(ref, ours)
        return None
    text = ours()
    assert text == ref, f"{name}: rendered text differs"
    assert messages == before, "render must not modify the caller's messages"
    # token ids: the qkv Tokenizer loaded from the folder transformers saved, template and all
    qtok = Tokenizer.from_file(_folder(name))
    ids = qtok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, **variables)
    ref_ids = hf.apply_chat_template(copy.deepcopy(messages), tokenize=True, return_dict=False,
                                     add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message, **copy.deepcopy(variables))
    assert ids == list(ref_ids), f"{name}: token ids differ"
    return text


@pytest.mark.parametrize("name", NAMES)
def test_conversations_match_transformers(name):
    rendered = 0
    for case, (messages, variables) in CASES.items():
        variables = dict(variables)
        if name == "llama3.1_json":
            variables.setdefault("date_string", "26 Jul 2024")  # no flake across midnight
        for agp in (False, True):
            try:
                rendered += _compare(name, messages, add_generation_prompt=agp, **variables) is not None
            except AssertionError as e:
                raise AssertionError(f"{name} / {case} / add_generation_prompt={agp}: {e}") from e
    assert rendered >= 10, f"{name}: too few conversations render at all ({rendered})"


@pytest.mark.parametrize("name", NAMES)
def test_continue_final_message_matches_transformers(name):
    for case, (messages, cont, variables) in CONTINUE.items():
        try:
            _compare(name, messages, continue_final_message=cont, **variables)
        except AssertionError as e:
            raise AssertionError(f"{name} / {case}: {e}") from e


def test_templates_are_the_real_ones():
    assert len(list(HERE.glob("*.jinja"))) >= 9
    assert "enable_thinking is defined and enable_thinking is false" in (HERE / "qwen3.jinja").read_text()
    assert "tools_in_user_message" in (HERE / "llama3.1_json.jinja").read_text()


def test_llama_date_from_strftime_now():
    messages = [SYS, U1]
    hf = _hf("llama3.1_json")
    ref = hf.apply_chat_template(messages, tokenize=False)
    ours = ChatTemplate(hf.chat_template, special_tokens=hf.special_tokens_map).render(messages)
    assert ours == ref and datetime.now().strftime("%d %b %Y") in ours


def test_roles_must_alternate_is_a_value_error_with_the_templates_message():
    template = ChatTemplate((HERE / "gemma3_pythonic.jinja").read_text(), special_tokens={"bos_token": "<bos>"})
    with pytest.raises(ValueError, match="Conversation roles must alternate user/assistant"):
        template.render([U1, U2])


def test_empty_conversation_is_refused_like_transformers():
    hf = _hf("chatml")
    with pytest.raises(ValueError):
        hf.apply_chat_template([], tokenize=False)
    with pytest.raises(ValueError, match="empty"):
        ChatTemplate(hf.chat_template).render([])
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.from_file(_folder("chatml")).apply_chat_template([])


def test_both_generation_prompt_and_continue_is_refused():
    with pytest.raises(ValueError):
        _hf("chatml").apply_chat_template([U1], tokenize=False, add_generation_prompt=True,
                                          continue_final_message=True)
    with pytest.raises(ValueError):
        ChatTemplate((HERE / "chatml.jinja").read_text()).render([U1], add_generation_prompt=True,
                                                                  continue_final_message=True)


def test_message_objects_and_none_keys():
    import dataclasses

    @dataclasses.dataclass
    class Msg:
        role: str
        content: str | None
        tool_calls: list | None = None

    messages = [Msg("user", "hi"), Msg("assistant", "hello")]
    hf = _hf("hermes")
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ChatTemplate(hf.chat_template, special_tokens=hf.special_tokens_map).render(messages) == ref


def test_rich_objects_become_placeholders_like_transformers():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    source = "{% for m in messages %}{% for b in m.content %}[{{ b.value }}]{% endfor %}{% endfor %}"
    blocks = [{"type": "x", "value": v} for v in (np.float32(1.5), np.bool_(False), np.int64(3), torch.tensor(2.0),
                                                  np.array(4), torch.zeros(2))]
    messages = [{"role": "user", "content": blocks}]
    ref = transformers.utils.chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=source)[0][0]
    assert ChatTemplate(source).render(messages) == ref


# ---------------------------------------------------------------- loading templates from a folder


def _save(tmp_path, name, template, jinja_files=True):
    hf = _hf(name, template)
    hf.save_pretrained(tmp_path, save_jinja_files=jinja_files)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("jinja_files", [True, False], ids=["chat_template.jinja", "tokenizer_config.json"])
def test_tokenizer_folder_loads_the_template(tmp_path, jinja_files):
    source = (HERE / "qwen3.jinja").read_text()
    hf = _save(tmp_path, "qwen3", source, jinja_files)
    assert (tmp_path / "chat_template.jinja").is_file() == jinja_files
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) != jinja_files
    qtok = Tokenizer.from_file(tmp_path)
    assert qtok.chat_template is not None and qtok.chat_template.source == hf.chat_template
    messages = [SYS, U1, A1, U2]
    assert qtok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) \
        == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert qtok.apply_chat_template(messages, add_generation_prompt=True) \
        == list(hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    assert ChatTemplate.from_folder(tmp_path).special_tokens == hf.special_tokens_map


@pytest.mark.parametrize("jinja_files", [True, False], ids=["additional_chat_templates", "tokenizer_config.json"])
def test_named_templates(tmp_path, jinja_files):
    named = {"default": (HERE / "chatml.jinja").read_text(), "tool_use": (HERE / "hermes.jinja").read_text(),
             "rag": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}
    hf = _save(tmp_path, "hermes", named, jinja_files)
    assert isinstance(hf.chat_template, dict)
    qtok = Tokenizer.from_file(tmp_path)
    assert qtok.chat_template.sources == hf.chat_template
    messages = [U1, A1]
    for kwargs in ({}, {"tools": [WEATHER]}, {"chat_template": "rag"}, {"chat_template": "tool_use"},
                   {"chat_template": "{{ messages | length }} messages"}, {"tools": [WEATHER], "chat_template": "rag"}):
        ref = hf.apply_chat_template(copy.deepcopy(messages), tokenize=False, **copy.deepcopy(kwargs))
        assert qtok.apply_chat_template(messages, tokenize=False, **kwargs) == ref, kwargs
        assert qtok.apply_chat_template(messages, **kwargs) == list(hf.apply_chat_template(
            copy.deepcopy(messages), return_dict=False, **copy.deepcopy(kwargs))), kwargs
    # a ChatTemplate saved by qkv loads back in transformers
    out = tmp_path / "resaved"
    qtok.save(out)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == hf.chat_template


def test_several_templates_without_default_is_refused(tmp_path):
    named = {"tool_use": (HERE / "hermes.jinja").read_text()}
    hf = _save(tmp_path, "hermes", named, True)
    with pytest.raises(ValueError):
        hf.apply_chat_template([U1], tokenize=False)
    template = Tokenizer.from_file(tmp_path).chat_template
    with pytest.raises(ValueError, match="default"):
        template.render([U1])
    ref = hf.apply_chat_template([U1], tokenize=False, tools=[WEATHER])
    assert template.render([U1], tools=[WEATHER]) == ref


def test_single_template_takes_the_argument_as_text():
    hf = _hf("chatml")
    ref = hf.apply_chat_template([U1], tokenize=False, chat_template="default")
    assert ChatTemplate(hf.chat_template).render([U1], chat_template="default") == ref == "default"


# ---------------------------------------------------------------- the sandbox


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set ns = namespace(_x=1) %}{{ ns._x }}",
    "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}{{ ns.a }}",
    "{% set xs = [] %}{{ xs.append(1) }}{{ xs }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ dict.__class__ }}{{ dict.mro() }}",
    "{{ raise_exception.__globals__ }}",
])
def test_sandbox_refuses_escapes_like_transformers(source):
    ref_kind, ref = _outcome(lambda: _hf("chatml", source).apply_chat_template([U1], tokenize=False))
    ours = _outcome(lambda: ChatTemplate(source).render([U1]))
    if ref_kind == "ok":  # jinja2 prints an unsafe attribute as empty; nothing leaks either way
        assert ours == ("ok", ref)
    else:
        assert ours[0] == "error" and isinstance(ours[1], (ValueError, type(ref))), ours


def test_tojson_does_not_html_escape_and_takes_options():
    source = ("{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}|"
              "{{ {'x': 'é'} | tojson(ensure_ascii=True, separators=(',', ':')) }}")
    messages = [{"role": "user", "content": "<a href='x'>&</a> é 🙂"}]
    out = ChatTemplate(source).render(messages)
    assert out.startswith("\"<a href='x'>&</a> é 🙂\"")
    assert out == _hf("chatml", source).apply_chat_template(messages, tokenize=False)


def test_strftime_now_and_loop_controls():
    source = "{{ strftime_now('%Y') }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}" \
             "{{ m.role }}{% endfor %}{{ dict(a=1) | tojson }}"
    assert ChatTemplate(source).render([U1, A1]) == f"{datetime.now().year}user{{\"a\": 1}}"


def test_generation_blocks_match_transformers_assistant_mask():
    source = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
              "{% endfor %}")
    messages = [U1, A1, U2, {"role": "assistant", "content": "Rain."}]
    text, spans = ChatTemplate(source).generation_spans(messages)
    assert [text[a:b] for a, b in spans] == ["It is sunny and 21 °C.<|im_end|>", "Rain.<|im_end|>"]
    hf = _hf("chatml", source)
    out = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ours = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]
    assert ours == list(out["assistant_masks"])


def test_batch_of_conversations_matches_transformers():
    hf = _hf("qwen3")
    batch = [[SYS, U1], [U1, A1, U2], [{"role": "user", "content": "🙂"}]]
    ref = hf.apply_chat_template(copy.deepcopy(batch), tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate(hf.chat_template, special_tokens=hf.special_tokens_map).render(batch, add_generation_prompt=True)
    assert isinstance(ours, list) and ours == ref


def test_pydantic_messages():
    pydantic = pytest.importorskip("pydantic", reason="installed with the test extras (openai, transformers)")

    class Msg(pydantic.BaseModel):
        role: str
        content: str | None = None
        reasoning_content: str | None = None

    messages = [Msg(role="user", content="hi"), Msg(role="assistant", content="yo", reasoning_content="hmm")]
    hf = _hf("qwen3")
    ref = hf.apply_chat_template(messages, tokenize=False)
    assert ChatTemplate(hf.chat_template, special_tokens=hf.special_tokens_map).render(messages) == ref


@pytest.mark.parametrize("name", ["mistral_tools", "gemma3_pythonic", "llama3.1_json"])
def test_sentencepiece_style_tokenizer_ids(tmp_path, name):
    """A Metaspace (SentencePiece-style) tokenizer: ids from the saved folder equal transformers' too."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Tok

    specials, markers = FAMILIES[name]
    tok = Tok(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=list(dict.fromkeys(["<unk>", *specials.values()])),
        initial_alphabet=[f"<0x{b:02X}>" for b in range(256)]))
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=(HERE / f"{name}.jinja").read_text(),
                                              **specials)
    hf.save_pretrained(tmp_path)
    qtok = Tokenizer.from_file(tmp_path)
    for messages in ([SYS, U1, A1, U2], [U1, A1, U2], [{"role": "user", "content": TRICKY}]):
        kw = {"date_string": "1 Jan 2025"} if name == "llama3.1_json" else {}
        ref_kind, ref = _outcome(lambda m=messages, kw=kw: hf.apply_chat_template(
            copy.deepcopy(m), return_dict=False, add_generation_prompt=True, **kw))
        if ref_kind == "error":
            _same_failure(ref, lambda m=messages, kw=kw: qtok.apply_chat_template(m, add_generation_prompt=True, **kw))
            continue
        assert qtok.apply_chat_template(messages, add_generation_prompt=True, **kw) == list(ref)
