#!/usr/bin/env python3
"""Checks the tokenizer fixtures against Hugging Face's Python libraries (a developer tool).

tools/make_tokenizer_fixtures.py writes tests/fixtures/tokenizer/ with expected answers from
Hugging Face's tokenizers core (through its Node binding), Jinja2 set up as transformers sets it
up, and SentencePiece's command-line tools; tokenizer_test and chat_template_test compare
TokenLake with those answers. This script asks Python's `tokenizers` and `transformers` the same
questions on the same files, so that the expected answers are known to be what those libraries
give:
  - tokenizers.Tokenizer.from_file(tokenizer.json): every encoding (ids) and decoding (text) of
    the byte-level BPE fixtures;
  - transformers.AutoTokenizer.from_pretrained(folder): the same encodings and decodings, and
    every chat of every fixture through apply_chat_template (the rendered text, its ids where
    the fixture has them, and the refusal where the fixture expects an error);
  - for spm_llama2, the encodings and decodings through Python's `sentencepiece` (the library
    whose answers TokenLake follows) and through transformers' Llama tokenizer, when the
    `sentencepiece` module is installed (otherwise said and skipped). Two differences between
    transformers 5 and SentencePiece are reported apart, each checked: a text starting with a
    space (transformers takes it as the dummy prefix), and a byte-fallback run that is not UTF-8
    (transformers replaces the whole run).

  python3 tools/check_tokenizer_fixtures.py [--fixtures tests/fixtures/tokenizer] [--json FILE]

Prints one line per fixture and check with the number compared and the mismatches (the first few
shown), writes them to --json, and exits 1 if any answer differs, 2 if a library is missing.
"""
import argparse
import json
import os
import re
import sys

BPE = ["bpe_llama3", "bpe_gpt2", "bpe_qwen2"]
SHOWN = 3


class Tally:
    def __init__(self):
        self.rows = []

    def add(self, fixture, check, compared, mismatches, note=None):
        row = dict(fixture=fixture, check=check, compared=compared,
                   mismatches=len(mismatches), examples=mismatches[:SHOWN])
        if note:
            row["note"] = note
        self.rows.append(row)
        status = "ok" if not mismatches else "MISMATCH"
        print(f"{fixture:11s} {check:36s} {compared:4d} compared, {len(mismatches):3d} differ"
              f"  {status}{'  (' + note + ')' if note else ''}")
        for m in mismatches[:SHOWN]:
            print("    " + json.dumps(m, ensure_ascii=False)[:400])


def check_tokenizers(tally, name, folder, expected):
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    bad = []
    for e in expected["encodings"]:
        got = tok.encode(e["text"], add_special_tokens=e["add_special_tokens"]).ids
        if got != e["ids"]:
            bad.append(dict(text=e["text"], expected=e["ids"], got=got))
    tally.add(name, "tokenizers encode", len(expected["encodings"]), bad)
    bad = []
    for e in expected["decodings"]:
        got = tok.decode(e["ids"], skip_special_tokens=e["skip_special_tokens"])
        if got != e["text"]:
            bad.append(dict(ids=e["ids"], expected=e["text"], got=got))
    tally.add(name, "tokenizers decode", len(expected["decodings"]), bad)


BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def render_pieces(pieces, spm_rule):
    """The text of SentencePiece pieces (special tokens already skipped): "▁" is a space, the
    first piece's leading space is dropped, and each run of byte-fallback pieces (<0xNN>) is
    decoded as UTF-8. spm_rule: each invalid byte of a run becomes U+FFFD and the valid ones are
    kept (SentencePiece's decoder); otherwise a run that is not UTF-8 as a whole becomes one
    U+FFFD per byte (the ByteFallback decoder of Hugging Face's tokenizers)."""
    out, run = [], bytearray()

    def flush():
        if not run:
            return
        try:
            out.append(run.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(run.decode("utf-8", errors="replace") if spm_rule else "\ufffd" * len(run))
        run.clear()

    for p in pieces:
        m = BYTE_PIECE.match(p)
        if m:
            run.append(int(m.group(1), 16))
            continue
        flush()
        out.append(p.replace("\u2581", " "))
    flush()
    text = "".join(out)
    return text[1:] if text.startswith(" ") else text


def byte_run_difference(tok, ids, expected, got):
    """True when a decoding differs only by how a run of byte-fallback pieces that is not valid
    UTF-8 is replaced: SentencePiece's rule gives `expected`, Hugging Face's gives `got`."""
    pieces = [p for p, i in zip(tok.convert_ids_to_tokens(ids), ids)
              if i not in tok.all_special_ids]
    return render_pieces(pieces, True) == expected and render_pieces(pieces, False) == got


def leading_space_difference(sp, text, got):
    """True when `text` starts with a space and `got` is SentencePiece's encoding of the text
    without it: transformers 5's Llama tokenizer, converted from tokenizer.model, takes a leading
    space as the dummy prefix, where SentencePiece (and Llama-2's own tokenizer.json, whose
    normalizer prepends the prefix to every text) adds one more."""
    return text.startswith(" ") and got == sp.encode(text[1:])


def check_sentencepiece(tally, name, folder, expected):
    """The fixture's answers against Python's sentencepiece (the library TokenLake follows)."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    bad = []
    for e in expected["encodings"]:
        got = ([sp.bos_id()] if e["add_special_tokens"] else []) + sp.encode(e["text"])
        if got != e["ids"]:
            bad.append(dict(text=e["text"], expected=e["ids"], got=got))
    tally.add(name, "sentencepiece encode", len(expected["encodings"]), bad)
    bad = []
    for e in expected["decodings"]:
        got = sp.decode(e["ids"])
        if got != e["text"]:
            bad.append(dict(ids=e["ids"], expected=e["text"], got=got))
    tally.add(name, "sentencepiece decode", len(expected["decodings"]), bad)
    return sp


def check_transformers(tally, name, folder, expected, encode=True, sp=None):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    print(f"{name:<11} transformers loads {type(tok).__name__}")
    if encode:
        bad, leading = [], []
        for e in expected["encodings"]:
            got = tok(e["text"], add_special_tokens=e["add_special_tokens"])["input_ids"]
            if got == e["ids"]:
                continue
            diff = dict(text=e["text"], expected=e["ids"], got=got)
            if (sp is not None and not e["add_special_tokens"] and
                    leading_space_difference(sp, e["text"], got)):
                leading.append(diff)
            else:
                bad.append(diff)
        tally.add(name, "transformers encode", len(expected["encodings"]), bad,
                  note=(f"{len(leading)} differ only before a leading space: transformers takes it "
                        "as the dummy prefix, SentencePiece adds one" if leading else None))
        for m in leading[:SHOWN]:
            print("    (leading space) " + json.dumps(m, ensure_ascii=False)[:400])
        bad, byte_runs = [], []
        for e in expected["decodings"]:
            got = tok.decode(e["ids"], skip_special_tokens=e["skip_special_tokens"],
                             clean_up_tokenization_spaces=False)
            if got == e["text"]:
                continue
            diff = dict(ids=e["ids"], expected=e["text"], got=got)
            if name.startswith("spm") and byte_run_difference(tok, e["ids"], e["text"], got):
                byte_runs.append(diff)
            else:
                bad.append(diff)
        tally.add(name, "transformers decode", len(expected["decodings"]), bad,
                  note=(f"{len(byte_runs)} differ only in a byte-fallback run that is not UTF-8: "
                        "SentencePiece replaces its invalid bytes, Hugging Face the whole run"
                        if byte_runs else None))
        for m in byte_runs[:SHOWN]:
            print("    (byte run) " + json.dumps(m, ensure_ascii=False)[:400])
    bad = []
    for c in expected["chats"]:
        kwargs = dict(add_generation_prompt=c["add_generation_prompt"])
        try:
            text = tok.apply_chat_template(c["messages"], tokenize=False, **kwargs)
        except Exception as e:  # the template's raise_exception: a jinja2 TemplateError
            if "error" not in c:
                bad.append(dict(messages=c["messages"], expected=c.get("text"), got_error=str(e)))
            continue
        if "error" in c:
            bad.append(dict(messages=c["messages"], expected_error=c["error"], got=text))
            continue
        if text != c["text"]:
            bad.append(dict(messages=c["messages"], expected=c["text"], got=text))
            continue
        if "ids" in c:
            ids = tok.apply_chat_template(c["messages"], tokenize=True, **kwargs)
            if not isinstance(ids, list):  # a BatchEncoding in some versions
                ids = ids["input_ids"]
            if ids != c["ids"]:
                bad.append(dict(messages=c["messages"], expected_ids=c["ids"], got_ids=ids))
    tally.add(name, "transformers apply_chat_template", len(expected["chats"]), bad)


def check_chats_without_tokenizer(tally, name, folder, expected):
    """The chats through transformers' own template renderer, without loading the tokenizer."""
    from transformers.utils import chat_template_utils
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token") if k in config}
    bad = []
    for c in expected["chats"]:
        try:
            rendered, _ = chat_template_utils.render_jinja_template(
                conversations=[c["messages"]], chat_template=config["chat_template"],
                add_generation_prompt=c["add_generation_prompt"], **special)
            text = rendered[0]
        except Exception as e:
            if "error" not in c:
                bad.append(dict(messages=c["messages"], expected=c.get("text"), got_error=str(e)))
            continue
        if "error" in c:
            bad.append(dict(messages=c["messages"], expected_error=c["error"], got=text))
        elif text != c["text"]:
            bad.append(dict(messages=c["messages"], expected=c["text"], got=text))
    tally.add(name, "transformers render_jinja_template", len(expected["chats"]), bad)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                       "fixtures", "tokenizer"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    try:
        import tokenizers
        import transformers
    except ImportError as e:
        print(f"check_tokenizer_fixtures: needs Python's tokenizers and transformers: {e}",
              file=sys.stderr)
        return 2
    print(f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}")
    tally = Tally()
    for name in BPE + ["spm_llama2"]:
        folder = os.path.join(args.fixtures, name)
        with open(os.path.join(args.fixtures, name + "_expected.json")) as f:
            expected = json.load(f)
        if name in BPE:
            check_tokenizers(tally, name, folder, expected)
            check_transformers(tally, name, folder, expected)
            continue
        try:
            sp = check_sentencepiece(tally, name, folder, expected)
            check_transformers(tally, name, folder, expected, sp=sp)
        except ImportError:
            tally.add(name, "transformers encode/decode", 0, [],
                      note="skipped: no sentencepiece module")
            check_chats_without_tokenizer(tally, name, folder, expected)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokenizers=tokenizers.__version__,
                           transformers=transformers.__version__, checks=tally.rows), f,
                      indent=1, ensure_ascii=False)
    differ = sum(r["mismatches"] for r in tally.rows)
    print(f"{sum(r['compared'] for r in tally.rows)} answers compared, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
