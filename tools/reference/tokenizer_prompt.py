"""Fixtures for `crates/diffusion/tests/tokenizer.rs` and `crates/diffusion/tests/prompt.rs`.

Writes into crates/diffusion/tests/fixtures/tokenizer/:

  tokenizer_cases.json   texts and the ids of transformers' CLIPTokenizer built offline from the
                         crate's embedded `assets/bpe_simple_vocab_16e6.txt.gz`: plain ids, and
                         BOS/EOS-wrapped ids padded to 77 with `<|endoftext|>` and with `!`
  folder_vocab_merges/   a small diffusers-style `tokenizer/` folder (vocab.json, merges.txt,
                         special_tokens_map.json, tokenizer_config.json; pad token `!`)
  folder_tokenizer_json/ the same small vocabulary as written by transformers' save_pretrained
                         (tokenizer.json, tokenizer_config.json)
  prompt_cases.json      A1111 WebUI prompt handling: parse_prompt_attention, extra networks,
                         comments, the 77-token chunks of sd_hijack_clip and the emphasis
                         rescaling, computed by the port of those functions below

The A1111 WebUI is not installable as a package, so the A1111 functions are re-implemented here
(`attention`, `extra_networks`, `strip_comments`, `chunks`) from the behaviour of
modules/prompt_parser.py, modules/extra_networks.py, extensions-builtin/Lora/extra_networks_lora.py,
modules/processing_scripts/comments.py, modules/sd_hijack_clip.py and modules/sd_emphasis.py
(A1111 1.10). Token ids come from transformers' CLIPTokenizer, as in A1111's SD1 text encoder.

Usage: .venv-ref/bin/python tools/reference/tokenizer_prompt.py
"""

import gzip
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
VOCAB_GZ = ROOT / "crates" / "diffusion" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
OUT = ROOT / "crates" / "diffusion" / "tests" / "fixtures" / "tokenizer"

MAX_LENGTH = 77
CHUNK = 75
COMMA_BACKTRACK = 20

# ---------------------------------------------------------------- the tokenizer


def byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    order, chars, extra = list(printable), [chr(b) for b in printable], 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_vocab(n_merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(VOCAB_GZ).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    if n_merges is not None:
        merges = merges[:n_merges]
    tokens = byte_chars()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


VOCAB, MERGES = clip_vocab()
assert len(VOCAB) == 49408 and len(MERGES) == 48894
TOK = CLIPTokenizer(vocab=VOCAB, merges=MERGES)
TOK_EXCLAMATION = CLIPTokenizer(vocab=VOCAB, merges=MERGES, pad_token="!")
assert (TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id, TOK_EXCLAMATION.pad_token_id) == (
    49406,
    49407,
    49407,
    0,
)


def ids(tok: CLIPTokenizer, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def padded(tok: CLIPTokenizer, text: str) -> list[int]:
    out = tok(text, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert len(out) == MAX_LENGTH
    return out


def long_prompt(words: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = (
        "portrait photo woman man girl boy smiling natural light soft shadows studio bokeh "
        "detailed skin freckles red dress blue jacket city street night rain neon reflections "
        "film grain 35mm lens sharp focus cinematic color grading golden hour beach waves sunset "
        "mountains forest autumn leaves snow winter coat scarf glasses earrings necklace hair "
        "ponytail braid curly short long black brown blonde silver eyes green hazel"
    ).split()
    out = []
    for i in range(words):
        word = rng.choice(vocab)
        r = rng.random()
        if r < 0.08:
            word = f"({word}:{rng.choice(['0.8', '1.1', '1.2', '1.35', '1.5'])})"
        elif r < 0.12:
            word = f"[{word}]"
        out.append(word + ("," if rng.random() < 0.3 and i + 1 < words else ""))
    return " ".join(out)


EASYPHOTO_POSITIVE = (
    "(cloth:1.5), (best quality), (realistic, photo-realistic:1.3), (beautiful eyes:1.3), "
    "(sparkling eyes:1.3), (beautiful mouth:1.3), finely detail, light smile, extremely detailed "
    "CG unity 8k wallpaper, huge filesize, best quality, realistic, photo-realistic, ultra high "
    "res, raw photo, put on makeup"
)
EASYPHOTO_NEGATIVE = (
    "(bags under the eyes:1.5), (bags under eyes:1.5), (earrings:1.3), (glasses:1.2), "
    "(naked:1.5), (nsfw:1.5), nude, breasts, penis, cum, (over red lips: 1.3), (bad lips: 1.3), "
    "(bad ears:1.3), (bad hair: 1.3), (bad teeth: 1.3), (worst quality:2), (low quality:2), "
    "(normal quality:2), lowres, watermark, badhand, lowres, bad anatomy, bad hands, normal "
    "quality, mural,"
)
# scripts/easyphoto_infer.py: the SD1 user prompt, then ", " + DEFAULT_POSITIVE; the negative is
# additional_neg_prompt (default "") + ", " + DEFAULT_NEGATIVE.
EASYPHOTO_SD1 = (
    "easyphoto_face, easyphoto, 1person, <lora:USER:0.9>, <lora:FilmVelvia3:0.65>, "
    "masterpiece, beauty, " + EASYPHOTO_POSITIVE
)
EASYPHOTO_SDXL = "easyphoto_face, easyphoto, 1person, <lora:USER>, masterpiece, beauty, " + EASYPHOTO_POSITIVE
EASYPHOTO_NEG = ", " + EASYPHOTO_NEGATIVE

TOKENIZER_TEXTS = [
    ("empty", ""),
    ("spaces_only", "   "),
    ("sentence", "a photo of an astronaut riding a horse on mars"),
    ("punctuation", "Hello, world! What's up? (test) [x] {y} <z> ... --- ;: \"quoted\" 'single' @#$%^&*_+=|\\/~`"),
    ("digits", "1234567890 3.14159 1girl 2boys 8k 4K 1,000,000 x2 v1.5"),
    ("chinese", "一个穿着红色连衣裙的女孩，站在海边。高清，杰作"),
    ("japanese", "東京の夜景、ひらがな カタカナ ｶﾀｶﾅ　全角スペース"),
    ("korean_russian_arabic", "안녕하세요 Привет мир مرحبا بالعالم"),
    ("devanagari", "नमस्ते दुनिया"),
    ("emoji", "🙂😀 👩‍👩‍👧 ❤️ 🇨🇳 🏳️‍🌈 flags✨"),
    ("accents", "café naïve résumé Ångström Øre straße İstanbul ǅ ﬁne"),
    ("combining", "cafe\u0301 n\u0303 A\u030a"),
    ("whitespace_runs", "  leading and trailing  \t tabs\tand\nnew\r\nlines   and    spaces  "),
    ("unicode_spaces", "ideographic\u3000space\u00a0nbsp\u2003em\u200bzwsp\u0085nel"),
    ("uppercase", "UPPERCASE Mixed CaSe MASTERPIECE, Best Quality"),
    ("html_entities", "&amp; &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;"),
    ("contractions", "it's don't we're I've I'm you'll he'd IT'S"),
    ("special_tokens", "<|startoftext|>a photo<|endoftext|> <|ENDOFTEXT|>"),
    ("fullwidth_superscripts", "ＡＢＣ１２３ x² ½ Ⅻ ①"),
    ("long_word_url", "supercalifragilisticexpialidocious https://example.com/a_b-c?d=1&e=f"),
    ("control_chars", "a\x00b\x07c\x1fd\x7fe"),
    ("easyphoto_masterpiece", "masterpiece, best quality, (realistic:1.2), photo-realistic, 1girl, <lora:easyphoto_face:0.9>"),
    ("easyphoto_sd1", EASYPHOTO_SD1),
    ("easyphoto_negative", EASYPHOTO_NEG),
    ("words_200", long_prompt(200, 1)),
]


def tokenizer_cases() -> list[dict]:
    out = []
    for name, text in TOKENIZER_TEXTS:
        case = {"name": name, "text": text, "ids": ids(TOK, text), "padded_eos": padded(TOK, text)}
        # transformers makes the pad token a special token, so with pad "!" a literal "!" in
        # the text becomes id 0: the Rust tokenizer does not (see README); skip those texts.
        case["padded_exclamation"] = None if "!" in text else padded(TOK_EXCLAMATION, text)
        out.append(case)
    return out


# ---------------------------------------------------------------- diffusers tokenizer folders

FOLDER_TEXTS = [
    "a photo of an astronaut riding a horse",
    "masterpiece, best quality, (realistic:1.2), 1girl",
    "Ünïcödé 你好 🙂 <|endoftext|>",
    long_prompt(120, 2),
]
SPECIAL = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def folder_fixtures() -> list[dict]:
    vocab, merges = clip_vocab(300)
    cases = []

    # A diffusers `tokenizer_2/` layout (SDXL's second tokenizer): vocab.json + merges.txt,
    # special tokens as objects in special_tokens_map.json, pad "!" as a plain string.
    folder = OUT / "folder_vocab_merges"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special_map = {
        "bos_token": {"content": "<|startoftext|>", **SPECIAL},
        "eos_token": {"content": "<|endoftext|>", **SPECIAL},
        "pad_token": "!",
        "unk_token": {"content": "<|endoftext|>", **SPECIAL},
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **SPECIAL},
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **SPECIAL},
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **SPECIAL},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.pad_token == "!" and tok.bos_token_id == 812 and tok.eos_token_id == 813
    cases.append(folder_case(folder, tok))

    # The same vocabulary saved by transformers (tokenizer.json), padded with <|endoftext|>.
    folder = OUT / "folder_tokenizer_json"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tmp) / name, folder / name)
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.pad_token == "<|endoftext|>" and not (folder / "vocab.json").exists()
    cases.append(folder_case(folder, tok))
    return cases


def folder_case(folder: Path, tok: CLIPTokenizer) -> dict:
    texts = [{"text": t, "ids": ids(tok, t), "padded": padded(tok, t)} for t in FOLDER_TEXTS]
    return {"folder": folder.name, "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "texts": texts}


# ---------------------------------------------------------------- A1111 prompt handling (port)


def attention(text: str) -> list[list]:
    """parse_prompt_attention: [[text, weight], ...]; a BREAK is ["BREAK", -1]."""
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for p in parts[start:]:
            p[1] *= factor

    def plain(s: str) -> None:
        for i, piece in enumerate(re.split(r"\s*\bBREAK\b\s*", s)):
            if i:
                parts.append(["BREAK", -1])
            parts.append([piece, 1.0])

    weight_close = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
    run = re.compile(r"[^\\()\[\]:]+")
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in "()[]\\":
                parts.append([nxt, 1.0])
                i += 2
            else:
                parts.append(["", 1.0])
                i += 1
        elif c == "(":
            round_open.append(len(parts))
            i += 1
        elif c == "[":
            square_open.append(len(parts))
            i += 1
        elif c == ":":
            m = weight_close.match(text, i)
            if m and round_open:
                scale(round_open.pop(), float(m.group(1)))
                i = m.end()
            elif m:
                plain(m.group(0))
                i = m.end()
            else:
                plain(":")
                i += 1
        elif c == ")" and round_open:
            scale(round_open.pop(), 1.1)
            i += 1
        elif c == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
            i += 1
        elif c in ")]":
            plain(c)
            i += 1
        else:
            m = run.match(text, i)
            plain(m.group(0))
            i = m.end()
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if not parts:
        parts = [["", 1.0]]
    merged = [parts[0]]
    for p in parts[1:]:
        if merged[-1][1] == p[1]:
            merged[-1][0] += p[0]
        else:
            merged.append(p)
    return merged


def extra_networks(prompt: str) -> tuple[str, list[dict]]:
    """extra_networks.parse_prompt, then the lora (alias lyco) and hypernet activate() rules."""
    found = []

    def take(m: re.Match) -> str:
        found.append((m.group(1), m.group(2).split(":")))
        return ""

    text = re.sub(r"<(\w+):([^>]+)>", take, prompt)
    networks = []
    for kind, items in found:
        if kind in ("lora", "lyco"):
            positional, named = [], {}
            for item in items:
                kv = item.split("=", 2)
                if len(kv) == 2:
                    named[kv[0]] = kv[1]
                else:
                    positional.append(item)
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else te
            unet = float(named.get("unet", unet))
            if len(positional) > 3:
                int(positional[3])  # dyn: not used, but A1111 fails on a non-integer
            if "dyn" in named:
                int(named["dyn"])
            networks.append({"kind": "lora", "name": positional[0], "te": te, "unet": unet})
        elif kind == "hypernet":
            weight = float(items[1]) if len(items) > 1 else 1.0
            networks.append({"kind": "hypernet", "name": items[0], "te": weight, "unet": weight})
    return text, networks


def strip_comments(text: str) -> str:
    text = re.sub("(^|\n)#[^\n]*(\n|$)", "\n", text)
    return re.sub("#[^\n]*(\n|$)", "\n", text)


def chunks(tok: CLIPTokenizer, line: str, pad_id: int) -> list[dict]:
    """tokenize_line (emphasis "Original", comma_padding_backtrack 20), then process_tokens'
    replacement of everything after the first <|endoftext|> by the pad id when they differ."""
    parsed = attention(line)
    comma = VOCAB[",</w>"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    done: list[tuple[list, list]] = []
    cur_t: list[int] = []
    cur_m: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal cur_t, cur_m, last_comma
        fill = CHUNK - len(cur_t)
        done.append(([bos] + cur_t + [eos] * fill + [eos], [1.0] + cur_m + [1.0] * fill + [1.0]))
        cur_t, cur_m, last_comma = [], [], -1

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in ids(tok, text):
            if token == comma:
                last_comma = len(cur_t)
            elif len(cur_t) == CHUNK and last_comma != -1 and len(cur_t) - last_comma <= COMMA_BACKTRACK:
                keep = last_comma + 1
                moved_t, moved_m = cur_t[keep:], cur_m[keep:]
                cur_t, cur_m = cur_t[:keep], cur_m[:keep]
                close()
                cur_t, cur_m = moved_t, moved_m
            if len(cur_t) == CHUNK:
                close()
            cur_t.append(token)
            cur_m.append(weight)
    if cur_t or not done:
        close()

    out = []
    for t, m in done:
        if pad_id != eos:
            first_eos = t.index(eos)
            t = t[: first_eos + 1] + [pad_id] * (len(t) - first_eos - 1)
        assert len(t) == len(m) == MAX_LENGTH
        out.append({"ids": t, "multipliers": m})
    return out


def emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """sd_emphasis.EmphasisOriginal.after_transformers."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    return z * (original_mean / z.mean())


def comma_boundary_prompt(comma_at: int) -> str:
    """"word" tokens with one comma so that the comma is token `comma_at` (0-based) of the
    prompt, followed by enough words to overflow 75 tokens."""
    words = ["photo"] * comma_at + [","] + ["portrait"] * (90 - comma_at)
    text = " ".join(words).replace(" ,", ",")
    assert ids(TOK, text).index(VOCAB[",</w>"]) == comma_at
    return text


ATTENTION_TEXTS = [
    # the docstring of parse_prompt_attention
    "normal text",
    "an (important) word",
    "(unbalanced",
    "\\(literal\\]",
    "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    # emphasis
    "(word)",
    "((word))",
    "(word:1.3)",
    "[word]",
    "[[word]]",
    "(over red lips: 1.3)",
    "(a:-1) (b:+.5) (c:2.) (d : 0.5 )",
    "([mixed]:1.5) ((a), b)",
    "(a:1.2:3)",
    "a:1.2) b",
    "x (y:1.5",
    "[unbalanced (both",
    "closing ) and ] alone",
    "(猫:1.2), 犬",
    # escapes
    "\\\\ a backslash, \\( \\) \\[ \\]",
    "a \\ lone backslash, \\x",
    "(a \\) b)",
    # BREAK
    "a BREAK b",
    "a  \n BREAK\tb",
    "BREAK",
    "BREAK BREAK",
    "aBREAK b, a BREAKfast, BREAK_x, break",
    "(BREAK)",
    "(x BREAK y:1.2)",
    "(B:-1)(REAK:-1)",
    # scheduling and AND are not parsed here: they pass through as text
    "[a:b:0.5] c AND d",
    "",
]

NETWORK_TEXTS = [
    EASYPHOTO_SD1,
    EASYPHOTO_SDXL,
    "1person, <lyco:style:0.5>, <hypernet:h:0.3> <hypernet:h2> <foo:bar:1> <lora:a:0.5:0.2>",
    "<lora:b:te=0.3:unet=0.4> <lora:c:0.7:te=0.1> <lora:d:1:2:3> <lora:e: 0.25 >",
    "<lora:> <lora> <:x> <lora:x<y:0.5> <LoRA:z:1> <lora:name with spaces:0.5>",
    "no networks here",
]
NETWORK_ERRORS = ["<lora:c:abc>", "<lora:te=1>", "<hypernet:h:x>", "<lora:x:abc:te=0.5>", "<lora:x:1:2:3.5>", "<lora:x:dyn=a>"]
ATTENTION_ERRORS = ["(a:1.2.3)", "(a:.)", "(a:..)"]

COMMENT_TEXTS = [
    "a photo # a comment\nof a cat",
    "# whole line\nsecond line\n#last",
    "x\n#c1\n#c2\ny",
    "no comment",
    "(a:1.2) #",
]


def chunk_texts() -> list[tuple[str, str]]:
    return [
        ("empty", ""),
        ("easyphoto_sd1", extra_networks(EASYPHOTO_SD1)[0]),
        ("easyphoto_sdxl", extra_networks(EASYPHOTO_SDXL)[0]),
        ("easyphoto_negative", EASYPHOTO_NEG),
        ("docstring", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
        ("break", "a photo of a cat BREAK (a dog:1.2) BREAK"),
        ("break_first", "BREAK a"),
        ("comma_at_60_backtracks", comma_boundary_prompt(60)),
        ("comma_at_55_backtracks", comma_boundary_prompt(55)),
        ("comma_at_54_stays", comma_boundary_prompt(54)),
        ("comma_is_token_75", comma_boundary_prompt(74)),
        ("comma_is_token_76", comma_boundary_prompt(75)),
        ("exactly_75", " ".join(["photo"] * 75)),
        ("exactly_150", " ".join(["photo"] * 150)),
        ("words_200", long_prompt(200, 1)),
        ("emphasis_across_chunks", "(" + " ".join(["photo"] * 80) + ":1.3), tail"),
        ("special_token_in_text", "a photo <|endoftext|> of a cat"),
    ]


def prompt_cases() -> dict:
    att = [{"text": t, "parts": attention(t)} for t in ATTENTION_TEXTS]
    for t in ATTENTION_ERRORS:
        try:
            attention(t)
        except ValueError:
            att.append({"text": t, "error": True})
        else:
            raise AssertionError(t)

    nets = []
    for t in NETWORK_TEXTS:
        text, found = extra_networks(t)
        nets.append({"prompt": t, "text": text, "networks": found})
    for t in NETWORK_ERRORS:
        try:
            extra_networks(t)
        except (ValueError, IndexError):
            nets.append({"prompt": t, "error": True})
        else:
            raise AssertionError(t)

    comments = [{"text": t, "stripped": strip_comments(t)} for t in COMMENT_TEXTS]

    chunk_cases = []
    for name, text in chunk_texts():
        chunk_cases.append(
            {"name": name, "text": text, "pad_eos": chunks(TOK, text, 49407), "pad_zero": chunks(TOK, text, 0)}
        )

    # the positive/negative pairs padded to the same number of chunks
    pairs = []
    for name, pos, neg in [
        ("easyphoto_sd1", extra_networks(EASYPHOTO_SD1)[0], EASYPHOTO_NEG),
        ("long_positive", long_prompt(200, 1), "lowres, bad anatomy"),
        ("long_negative", "a cat", long_prompt(120, 3)),
    ]:
        c, u = chunks(TOK, pos, 49407), chunks(TOK, neg, 49407)
        empty = chunks(TOK, "", 49407)[0]
        n = max(len(c), len(u))
        pairs.append(
            {
                "name": name,
                "positive": pos,
                "negative": neg,
                "chunks": [len(c), len(u)],
                "positive_padded": c + [empty] * (n - len(c)),
                "negative_padded": u + [empty] * (n - len(u)),
            }
        )

    gen = torch.Generator().manual_seed(77)
    emph = []
    for name, texts in [("one_prompt", ["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."]), ("batch_of_two", ["(cat:1.4), [dog]", "plain"])]:
        mult = torch.tensor([chunks(TOK, t, 49407)[0]["multipliers"] for t in texts], dtype=torch.float32)
        z = torch.randn((len(texts), MAX_LENGTH, 8), generator=gen, dtype=torch.float32)
        out = emphasis(z, mult)
        emph.append(
            {
                "name": name,
                "shape": list(z.shape),
                "z": z.flatten().tolist(),
                "multipliers": mult.flatten().tolist(),
                "expected": out.flatten().tolist(),
            }
        )

    return {
        "attention": att,
        "extra_networks": nets,
        "comments": comments,
        "chunks": chunk_cases,
        "pairs": pairs,
        "emphasis": emph,
    }


def write_json(path: Path, value: dict[str, list]) -> None:
    """One case per line."""
    compact = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    sections = [f"{compact(k)}:[\n" + ",\n".join(compact(case) for case in cases) + "\n]" for k, cases in value.items()]
    path.write_text("{\n" + ",\n".join(sections) + "\n}\n", encoding="utf-8")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "tokenizer_cases.json", {"cases": tokenizer_cases(), "folders": folder_fixtures()})
    write_json(OUT / "prompt_cases.json", prompt_cases())


if __name__ == "__main__":
    main()
