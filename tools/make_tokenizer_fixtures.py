#!/usr/bin/env python3
"""Makes the tokenizer fixtures under tests/fixtures/tokenizer/ (a developer tool, not a build step).

What it writes, and where every expected answer comes from:
  bpe_llama3/   tokenizer.json + tokenizer_config.json (chat_template inside, Llama-3 kind):
                byte-level BPE with Llama-3's Split regex, ignore_merges, special tokens and a
                TemplateProcessing BOS.
  bpe_gpt2/     tokenizer.json + tokenizer_config.json + chat_template.jinja (ChatML kind):
                the same vocabulary with GPT-2's ByteLevel pre-tokenizer (its built-in regex,
                add_prefix_space) and no BOS.
  bpe_qwen2/    the same vocabulary as Qwen-2 sets a tokenizer up: an NFC normalizer, Qwen's
                Split regex (single digits), no BOS, the ChatML template in tokenizer_config.json.
  spm_llama2/   tokenizer.model (SentencePiece BPE with byte fallback, as Llama-2 is trained) +
                tokenizer_config.json (Llama-2 kind of chat template).
  *_expected.json  encodings, decodings and chat renderings to compare with.

The byte-level BPE is trained by Hugging Face's tokenizers library (its Rust core, through the
Node binding published on npm as @anush008/tokenizers, tokenizers 0.22) with its default
BpeTrainer on the text embedded below; the merge list is then cut to its first MERGES merges,
which is what a smaller vocab_size would have given (BPE training adds merges greedily, in
order), and the byte alphabet completed so every UTF-8 string can be encoded. Expected
encodings and decodings come from that same library loading the written tokenizer.json.
Chat renderings come from Jinja2 set up exactly as transformers' apply_chat_template sets it up
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, its tojson and
raise_exception). SentencePiece expectations come from spm_encode / spm_decode (Debian package
`sentencepiece`).

Needs: python3 with jinja2, node + npm (the npm packages are installed into --node-prefix),
spm_train/spm_encode/spm_decode (Debian package `sentencepiece`). No downloads besides the npm
package.

Usage: tools/make_tokenizer_fixtures.py [--out tests/fixtures/tokenizer] [--node-prefix DIR]
"""

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile

MERGES = 500
NODE_PACKAGE = "@anush008/tokenizers@0.6.0"
SEED = 20261204

# Training text: a few KB mixing scripts, emoji (with ZWJ sequences, skin tones, flags),
# contractions, numbers, code, and runs of spaces, tabs and newlines.
CORPUS = """\
The pool keeps the key and value tensors of shared prefixes, so a request that starts with a
known system prompt skips most of its prefill. It's simple: we'll match, load, and reuse.
They're caching what they've computed; I'm sure you'd agree it DOESN'T hurt. Don't you think?
Numbers: 1, 22, 333, 4444, 55555, 3.14159, 2026-12-04, 0x7fff, 1e-6, 100%, $19.99, #42.
    Indented line with four spaces.
\tA tab, then\ttwo\t\ttabs, and trailing spaces   
Lines


with blank lines between.   Multiple   spaces   inside.
def match(tokens):\n    return [t for t in tokens if t > 0]  # code, with symbols {}[]()<>=!?
Grüße aus München! Über die Brücke, schöne Äpfel, süße Öle, Straße und Maß.
Ça va très bien, merci. L'été dernier, nous sommes allés à la plage; c'était génial.
¿Dónde está la biblioteca? Mañana será otro día, señor. ¡Olé!
Привет, как дела? Сегодня хорошая погода, и мы идём гулять в парк.
Καλημέρα κόσμε! Η γλώσσα είναι όμορφη.
你好，世界。今天天气很好，我们去公园散步吧。缓存前缀可以节省计算。
こんにちは世界。東京は大きな都市です。カタカナとひらがな。
안녕하세요 세계. 오늘은 날씨가 좋습니다.
مرحبا بالعالم. كيف حالك اليوم؟
नमस्ते दुनिया। आप कैसे हैं?
Emoji: 🙂 😀 🚀 🎉 👍🏽 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪 🇯🇵 ❤️ ✨ 🔥 🤖
Mixed: naïve café résumé coöperate — “quotes” ‘single’ … • → ← ∑ ∞ ≈ ≠ ± × ÷ ° µ
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! the quick brown fox?
A language model serves many users; each user sends a prompt; each prompt has a prefix.
Prefix caching across instances: a cluster-wide pool, balanced, replicated when hot.
"""

# Strings whose encodings and decodings are checked (besides random ones below).
TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello world!",
    " Hello world",
    "The pool keeps the key and value tensors of shared prefixes.",
    "It's simple: we'll match, load, and reuse. They're caching; I'M SURE.",
    "Numbers 1 22 333 4444 55555 666666 3.14159 2026-12-04",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\nnewlines\n\n\nand \r\n carriage returns",
    "a  b   c    d     e      f",
    "\n",
    "\n\n  \n",
    "Grüße aus München! Ça va très bien.",
    "Привет, как дела? Καλημέρα κόσμε!",
    "你好，世界。こんにちは世界。안녕하세요",
    "مرحبا بالعالم. नमस्ते दुनिया।",
    "Emoji 🙂🚀 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪 ❤️ 👍🏽",
    "unseen words: zyxwvut qqqq Ωμέγα ℵ₀ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001f9ec",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment",
    "\x00\x01\x7f control characters \u200b zero width",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]

# Texts holding special / added tokens, per fixture.
SPECIAL_TEXTS = {
    "bpe_llama3": [
        "<|begin_of_text|>Hello",
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>",
        "a<|eot_id|><|eot_id|>b",
        "text <think>reasoning</think> answer",
        "no <|eot_id special |> here",
        "x <mask> y",
        "x<mask>y",
        "<|ünï|> and <|ünï|>",
        "<|begin_of_text|><|begin_of_text|>",
    ],
    "bpe_qwen2": [
        "Cafe\u0301 A\u030a \u1100\u1161 e\u0301\u0323 \ufb01 \u212b done",
        "<|im_start|>user\nCafe\u0301<|im_end|>",
        "digits 1234567 and 3.14",
    ],
    "bpe_gpt2": [
        "Hello<|endoftext|>World",
        "<|endoftext|>",
        " <|endoftext|> spaced <|endoftext|> ",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "a<| sp ace |>b <| sp ace |>",
    ],
}

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{%- if system_message %}\n"
    "    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message.role not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Unknown role: ' ~ message.role) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# ChatML kind, written as its own chat_template.jinja; uses block tags without `-` so that
# trim_blocks / lstrip_blocks matter, plus loop.first / loop.last, elif, length, upper, tojson,
# `in`, `and` / `or` / `not`, and a trailing newline that Jinja drops.
CHATML_TEMPLATE = """\
{% for message in messages %}
  {% if loop.first and message.role != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
  {% endif %}
  {% if message.role == 'system' and not loop.first %}
    {{ raise_exception('The system message must come first') }}
  {% elif message.role in ['user', 'assistant', 'system'] %}
<|im_start|>{{ message.role }}
{{ message.content | trim }}<|im_end|>
  {% else %}
    {{ raise_exception('Unknown role: ' + message.role | upper) }}
  {% endif %}
  {% if loop.last and message.meta is defined %}
{{ message.meta | tojson }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt or messages | length == 0 %}
<|im_start|>assistant
{% endif %}
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  You are terse.  "},
     {"role": "user", "content": "What is a prefix cache?"},
     {"role": "assistant", "content": "A pool of KV tensors.\n"},
     {"role": "user", "content": "Grüße 🙂 — and 你好?"}],
    [{"role": "user", "content": "  spaces   inside  \n\n"},
     {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "one", "meta": {"lang": "ü", "n": [1, 2.5, True, None]}}],
]
# Conversations each template must refuse (the template raises); per fixture.
BAD_CONVERSATIONS = {
    "bpe_llama3": [[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                   [{"role": "tool", "content": "a"}]],
    "bpe_gpt2": [[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                 [{"role": "robot", "content": "a"}]],
    "bpe_qwen2": [[{"role": "robot", "content": "a"}]],
    "spm_llama2": [[{"role": "assistant", "content": "a"}]],
}

NODE_HELPER = r"""
const fs = require('fs');
const tk = require('@anush008/tokenizers');
const req = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
(async () => {
  if (req.action === 'train') {
    const t = tk.Tokenizer.fromFile(req.config);
    t.train([req.corpus]);
    t.save(req.out, true);
    return;
  }
  const t = tk.Tokenizer.fromFile(req.tokenizer);
  const out = {encode: [], decode: []};
  for (const e of req.encode) {
    const enc = await t.encode(e.text, null, {addSpecialTokens: e.add_special_tokens});
    out.encode.push(enc.getIds());
  }
  for (const d of req.decode) out.decode.push(await t.decode(d.ids, d.skip_special_tokens));
  fs.writeFileSync(req.out, JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def byte_level_alphabet():
    """GPT-2's byte-to-unicode map's image (all 256 characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


class Node:
    def __init__(self, prefix, workdir):
        self.prefix = prefix
        self.workdir = workdir
        if not os.path.isdir(os.path.join(prefix, "node_modules", "@anush008", "tokenizers")):
            os.makedirs(prefix, exist_ok=True)
            subprocess.run(["npm", "install", "--prefix", prefix, "--no-save", "--no-audit",
                            "--no-fund", NODE_PACKAGE], check=True)
        self.helper = os.path.join(workdir, "helper.js")
        with open(self.helper, "w") as f:
            f.write(NODE_HELPER)

    def call(self, request):
        path = os.path.join(self.workdir, "request.json")
        with open(path, "w") as f:
            json.dump(request, f)
        env = dict(os.environ, NODE_PATH=os.path.join(self.prefix, "node_modules"))
        subprocess.run(["node", self.helper, path], check=True, env=env)


def random_text(rng, n):
    """A random valid UTF-8 string from ASCII, whitespace runs, Latin-1, other scripts, emoji."""
    pools = [
        [chr(c) for c in range(0x20, 0x7F)],
        [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n"],
        [chr(c) for c in range(0xA0, 0x180)],
        [chr(c) for c in range(0x400, 0x450)] + [chr(c) for c in range(0x4E00, 0x4E40)],
        ["🙂", "🚀", "👩‍💻", "🇩🇪", "❤️", "👍🏽", "\U0001f9ec", "\u200b"],
        ["'s", "'ll", "'RE", "the", " the", "pool", "123456", "München", "你好"],
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def jinja_render(template, conversation, add_generation_prompt, special):
    """Renders as transformers' apply_chat_template does (its _compile_jinja_template)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
    try:
        return env.from_string(template).render(messages=conversation,
                                                add_generation_prompt=add_generation_prompt,
                                                **special), None
    except jinja2.exceptions.TemplateError as e:
        return None, str(e)


def train_bpe(node, workdir):
    """Trains with HF's BpeTrainer (Llama-3 pre-tokenizer), keeps the first MERGES merges."""
    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(CORPUS)
    config = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": LLAMA3_PRE_TOKENIZER, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {}, "merges": []},
    }
    config_path = os.path.join(workdir, "untrained.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    trained_path = os.path.join(workdir, "trained.json")
    node.call({"action": "train", "config": config_path, "corpus": corpus, "out": trained_path})
    with open(trained_path) as f:
        trained = json.load(f)
    model = trained["model"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]][:MERGES]
    vocab_by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    keep = set(a + b for a, b in merges)
    tokens = [tok for tok, _ in vocab_by_id if len(tok) == 1 or tok in keep]
    for ch in byte_level_alphabet():
        if ch not in tokens:
            tokens.append(ch)
    return {tok: i for i, tok in enumerate(tokens)}, merges


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}


def added(id_, content, special=True, lstrip=False, rstrip=False):
    return {"id": id_, "content": content, "single_word": False, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": False, "special": special}


def make_bpe_fixtures(out, vocab, merges, node, workdir, rng):
    n = len(vocab)
    fixtures = {}
    # Llama-3 kind.
    llama3_added = [added(n, "<|begin_of_text|>"), added(n + 1, "<|end_of_text|>"),
                    added(n + 2, "<|start_header_id|>"), added(n + 3, "<|end_header_id|>"),
                    added(n + 4, "<|eot_id|>"), added(n + 5, "<think>", special=False),
                    added(n + 6, "</think>", special=False),
                    added(n + 7, "<mask>", lstrip=True), added(n + 8, "<|ünï|>")]
    fixtures["bpe_llama3"] = {
        "tokenizer": {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": llama3_added,
            "normalizer": None, "pre_tokenizer": LLAMA3_PRE_TOKENIZER,
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                 "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                                          "ids": [n], "tokens": ["<|begin_of_text|>"]}}},
            ]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges},
        },
        "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "chat_template": LLAMA3_TEMPLATE, "model_max_length": 8192,
                   "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                            for t in llama3_added}},
        "template": LLAMA3_TEMPLATE,
        "special": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    }
    # GPT-2 kind: GPT-2's own regex inside ByteLevel, add_prefix_space, no BOS.
    gpt2_added = [added(n, "<|endoftext|>"), added(n + 1, "<|im_start|>"),
                  added(n + 2, "<|im_end|>"), added(n + 3, "<| sp ace |>", special=False)]
    fixtures["bpe_gpt2"] = {
        "tokenizer": {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": gpt2_added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True,
                              "trim_offsets": True, "use_regex": True},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True,
                               "trim_offsets": True, "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": False, "byte_fallback": False,
                      "vocab": vocab, "merges": [" ".join(m) for m in merges]},
        },
        "config": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                   "add_bos_token": False},
        "template_file": CHATML_TEMPLATE,
        "template": CHATML_TEMPLATE,
        "special": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    }

    # Qwen-2 kind: NFC, single-digit numbers, ChatML in tokenizer_config.json.
    qwen_added = [added(n, "<|endoftext|>"), added(n + 1, "<|im_start|>"),
                  added(n + 2, "<|im_end|>")]
    qwen_regex = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
    fixtures["bpe_qwen2"] = {
        "tokenizer": {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": qwen_added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": qwen_regex}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False}]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                               "trim_offsets": False, "use_regex": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges},
        },
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE},
        "template": CHATML_TEMPLATE,
        "special": {"bos_token": None, "eos_token": "<|im_end|>"},
        "random_texts": 8,
        "random_ids": 8,
    }

    for name, fx in fixtures.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        tok_path = os.path.join(d, "tokenizer.json")
        with open(tok_path, "w", encoding="utf-8") as f:
            json.dump(fx["tokenizer"], f, ensure_ascii=False, separators=(",", ":"))
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(fx["config"], f, ensure_ascii=False, indent=1)
        if "template_file" in fx:
            with open(os.path.join(d, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(fx["template_file"])

        texts = TEXTS + SPECIAL_TEXTS[name]
        random_texts = [random_text(rng, rng.randint(1, 30))
                        for _ in range(fx.get("random_texts", 12))]
        chats = []
        for conv in CONVERSATIONS:
            for gen in (False, True):
                text, err = jinja_render(fx["template"], conv, gen, fx["special"])
                assert err is None, (name, conv, err)
                chats.append({"messages": conv, "add_generation_prompt": gen, "text": text})
        for conv in BAD_CONVERSATIONS[name]:
            text, err = jinja_render(fx["template"], conv, True, fx["special"])
            assert text is None, (name, conv)
            chats.append({"messages": conv, "add_generation_prompt": True, "error": err})

        # Both settings of add_special_tokens for the written texts, one for the random ones.
        enc_requests = []
        for t in texts:
            enc_requests += [{"text": t, "add_special_tokens": True},
                             {"text": t, "add_special_tokens": False}]
        for t in random_texts:
            enc_requests.append({"text": t, "add_special_tokens": True})
        for c in chats:
            if "text" in c:
                enc_requests.append({"text": c["text"], "add_special_tokens": False})
        vocab_size = n + len(fx["tokenizer"]["added_tokens"])
        # Random id sequences: single bytes of multi-byte characters split across tokens,
        # special tokens anywhere.
        random_ids = [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 24))]
                      for _ in range(fx.get("random_ids", 12))]
        result_path = os.path.join(workdir, "result.json")
        node.call({"action": "run", "tokenizer": tok_path, "encode": enc_requests,
                   "decode": [], "out": result_path})
        with open(result_path) as f:
            encoded = json.load(f)["encode"]
        dec_requests = []
        # Decodings of each text's encoding (with its special tokens) and of the random ids.
        n_text_encodings = 2 * len(texts) + len(random_texts)
        # skip_special_tokens matters only where an added token is present.
        for ids in (encoded[0:2 * len(texts):2] + encoded[2 * len(texts):n_text_encodings] +
                    random_ids):
            dec_requests.append({"ids": ids, "skip_special_tokens": False})
            if any(i >= n for i in ids):
                dec_requests.append({"ids": ids, "skip_special_tokens": True})
        node.call({"action": "run", "tokenizer": tok_path, "encode": [], "decode": dec_requests,
                   "out": result_path})
        with open(result_path) as f:
            decoded = json.load(f)["decode"]

        expected = {"encodings": [], "decodings": [], "chats": []}
        for req, ids in zip(enc_requests, encoded):
            expected["encodings"].append(dict(req, ids=ids))
        for req, text in zip(dec_requests, decoded):
            expected["decodings"].append(dict(req, text=text))
        chat_ids = iter(encoded[n_text_encodings:])
        for c in chats:
            if "text" in c:
                c["ids"] = next(chat_ids)
            expected["chats"].append(c)
        write_expected(os.path.join(out, name + "_expected.json"), expected)


def make_spm_fixture(out, workdir, rng):
    """SentencePiece BPE with byte fallback, trained as Llama-2's tokenizer.model was."""
    d = os.path.join(out, "spm_llama2")
    os.makedirs(d, exist_ok=True)
    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(CORPUS)
    prefix = os.path.join(workdir, "spm")
    subprocess.run(["spm_train", f"--input={corpus}", f"--model_prefix={prefix}",
                    "--model_type=bpe", "--vocab_size=600", "--byte_fallback=true",
                    "--character_coverage=0.98", "--split_digits=true",
                    "--allow_whitespace_only_pieces=true", "--remove_extra_whitespaces=false",
                    "--normalization_rule_name=identity", "--unk_id=0", "--bos_id=1",
                    "--eos_id=2", "--pad_id=-1", "--minloglevel=2"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(prefix + ".model", "rb") as src, open(os.path.join(d, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    # The tokenizer class, as a Llama-2 checkpoint's tokenizer_config.json names it (without it
    # transformers guesses a tokenizer that neither adds nor strips SentencePiece's dummy
    # prefix), and "legacy": its SentencePiece behaviour, the dummy prefix always added (the
    # non-legacy one adds it only to text that does not start with a space).
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True,
              "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer",
              "chat_template": LLAMA2_TEMPLATE}
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)

    def spm(tool, lines, *flags):
        r = subprocess.run([tool, f"--model={prefix}.model", *flags], input="\n".join(lines) + "\n",
                           capture_output=True, text=True, check=True)
        return r.stdout.split("\n")[:len(lines)]

    # spm_encode reads lines: texts without newlines only.
    texts = [t for t in TEXTS if "\n" not in t and "\r" not in t and t]
    texts += [random_text(rng, rng.randint(1, 30)).replace("\n", " ").replace("\r", " ")
              for _ in range(20)]
    texts = [t for t in texts if t.strip()]
    ids = [[int(x) for x in line.split()] for line in spm("spm_encode", texts, "--output_format=id")]
    expected = {"encodings": [], "decodings": [], "chats": []}
    for t, i in zip(texts, ids):
        expected["encodings"].append({"text": t, "add_special_tokens": False, "ids": i})
    expected["encodings"].append({"text": texts[0], "add_special_tokens": True, "ids": [1] + ids[0]})
    random_ids = [[rng.randrange(3, 600) for _ in range(rng.randint(1, 16))] for _ in range(12)]
    # One spm_decode run per sequence: a decoded text may itself hold newlines.
    decoded = []
    for i in ids + random_ids:
        r = subprocess.run(["spm_decode", f"--model={prefix}.model", "--input_format=id"],
                           input=" ".join(map(str, i)) + "\n", capture_output=True, text=True,
                           check=True)
        assert r.stdout.endswith("\n")
        decoded.append(r.stdout[:-1])
    for i, text in zip(ids + random_ids, decoded):
        expected["decodings"].append({"ids": i, "skip_special_tokens": True, "text": text})
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    for conv in CONVERSATIONS:
        text, err = jinja_render(LLAMA2_TEMPLATE, conv, False, special)
        assert err is None, (conv, err)
        expected["chats"].append({"messages": conv, "add_generation_prompt": False, "text": text})
    for conv in BAD_CONVERSATIONS["spm_llama2"]:
        text, err = jinja_render(LLAMA2_TEMPLATE, conv, False, special)
        assert text is None
        expected["chats"].append({"messages": conv, "add_generation_prompt": False, "error": err})
    write_expected(os.path.join(out, "spm_llama2_expected.json"), expected)


def write_expected(path, expected):
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        keys = list(expected)
        for k_i, k in enumerate(keys):
            f.write(f' "{k}": [\n')
            rows = expected[k]
            for r_i, row in enumerate(rows):
                f.write("  " + json.dumps(row, ensure_ascii=False, separators=(",", ":")))
                f.write(",\n" if r_i + 1 < len(rows) else "\n")
            f.write(" ]" + (",\n" if k_i + 1 < len(keys) else "\n"))
        f.write("}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "tokenizer"))
    parser.add_argument("--node-prefix", default=os.path.join(tempfile.gettempdir(),
                                                              "tokenlake-tokenizer-fixtures"))
    args = parser.parse_args()
    rng = random.Random(SEED)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        node = Node(args.node_prefix, workdir)
        vocab, merges = train_bpe(node, workdir)
        make_bpe_fixtures(args.out, vocab, merges, node, workdir, rng)
        make_spm_fixture(args.out, workdir, rng)
    print(f"wrote fixtures under {os.path.normpath(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
