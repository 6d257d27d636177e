"""Reference token ids for sdtrain's CLIP tokenizer parity test (tests/text/).

Run in the reference environment (tools/requirements.txt):
    ~/.cache/sdtrain/venv/bin/python tools/make_tokenizer_fixtures.py

For every tokenizer folder below it loads transformers' CLIPTokenizer exactly as diffusers
does (CLIPTokenizer.from_pretrained(<model>/tokenizer)) and writes, for each prompt of the
corpus, the ids of tokenizer(prompt, truncation=True, max_length=model_max_length) and the text
of tokenizer.decode(ids, skip_special_tokens=True). It checks that padding="max_length" only
appends pad ids, so the test may derive the padded ids from these.

Folders:
  sd2                       SD 2.x layout: special_tokens_map.json sets pad_token "!" (id 0)
  sd15                      SD 1.5 layout: pad_token "<|endoftext|>" (id 49407)
  sd2_added_tokens_decoder  SD 2.x / SDXL tokenizer_2 as transformers >= 4.34 re-saves it
                            (tokenizer_config.json holds added_tokens_decoder)
  demo                      configs/demo/model/tokenizer (first 1000 merges, pad "!")
The first three use data/tokenizer/{sd1,sd2}/*.json (tests/fixtures/tokenizer/ for the third) plus vocab.json and merges.txt
derived from the full CLIP merge list (data/clip/merges.txt),
which is what the C++ test does too.

Output: tests/fixtures/tokenizer/reference_ids.json
"""
import importlib.metadata
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from clip_bpe import write_tokenizer_files  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "tokenizer"
BPE_MERGES = ROOT / "data" / "clip" / "merges.txt"


def corpus():
    """(category, prompt) pairs; deterministic."""
    items = []

    def add(category, prompts):
        items.extend((category, p) for p in prompts)

    subjects = ["dog", "cat", "woman", "man", "castle", "robot", "car", "backpack", "teapot", "owl"]
    styles = ["oil painting", "watercolor", "photograph", "pencil sketch", "3d render",
              "anime illustration", "studio portrait", "cinematic still"]
    add("english", [
        "a photo of an astronaut riding a horse on mars",
        "A Photo Of An Astronaut Riding A Horse On Mars",
        "A PHOTO OF A DOG",
        "portrait of a woman, highly detailed, 8k, trending on artstation",
        "a beautiful landscape with mountains and a lake at sunset",
        "the quick brown fox jumps over the lazy dog",
        "a cozy cabin in the woods during winter, warm lights, snow",
        "a futuristic city skyline at night with neon lights",
        "an astronaut",
        "photograph",
        "a",
        "a red apple on a wooden table",
        "close-up shot of a hummingbird drinking nectar",
        "a bowl of ramen, food photography, shallow depth of field",
        "a steampunk airship flying over victorian london",
        "a minimalist logo of a mountain",
        "isometric view of a tiny island with a lighthouse",
        "an oil painting of a ship in a storm by j.m.w. turner",
        "a black and white photo of a jazz musician playing saxophone",
        "a knight in shining armor standing in a field of flowers",
    ])
    rng = random.Random(3)
    add("english", [f"a {rng.choice(styles)} of a {rng.choice(subjects)} in the style of "
                    f"{rng.choice(['van gogh', 'monet', 'greg rutkowski', 'studio ghibli', 'pixar'])}"
                    for _ in range(30)])
    add("identifier", [
        "a photo of sks dog", "a photo of sks dog in a bucket", "a sks dog wearing a santa hat",
        "sks", "SKS", "Sks dog", "sks sks sks", "a photo of zwx person", "zwx", "ZWX man smiling",
        "a photo of riobugger", "riobugger", "riobugger riding a bike", "RioBugger",
        "a photo of <<TOK>>", "<<TOK>>", "<<tok>>", "a <<TOK>> dog on the beach",
        "<<TOK>><<TOK>>", "a photo of a [V] dog", "photo of sks-dog", "sks_dog", "sks.dog",
        "a photo of ohwx woman", "a painting of sks dog by picasso", "a photo of sks123",
        "a sks backpack on the moon", "zwx sks riobugger <<TOK>>", "(sks dog:1.3)",
        "a photo of a dog", "a photo of a person",
    ])
    add("punctuation", [
        "...", "a, b; c: d.", "hello, world.", "what?!", "?!?!?!", "--", "a -- b", "(masterpiece)",
        "((best quality))", "[[[detailed]]]", "{a|b|c}", "(best quality:1.2), (ugly:-0.5)",
        "\"quoted\" words", "'single quoted'", "it's a dog's life", "don't can't won't",
        "I'm you're we've they'll he'd", "IT'S DON'T", "it’s curly", "''s", "'", "a'b",
        "rock'n'roll", "e-mail @user #hashtag $5 %20 ^_^ &amp; *star*", "~~~", "|||", "a/b\\c",
        "<>", "<<", ">>", "a.b.c", "....!!!!", "-_-", ":)", ";-)", "<3", "</w>", "a</w>b",
        "hello world </w>", "__init__", "©®™", "«guillemets»", "„Anführungszeichen“",
        "—em dash—", "…", "·•°",
    ])
    add("numbers", [
        "1", "12", "123", "1024x768", "3.14159", "2023-11-22", "1,000,000", "4k 8k uhd",
        "v1.5", "sd2.1", "0.5:1.3", "a photo taken in 1999", "24mm f/1.4 lens", "100%",
        "½ ¾", "x² + y²", "Ⅻ roman", "٣ ٤ arabic-indic", "①②③", "１２３ fullwidth", "9999999999",
        "-1", "+42", "#1", "1st 2nd 3rd 4th",
    ])
    add("accents", [
        "café", "naïve", "Crème Brûlée", "Ångström", "cafe\u0301 decomposed", "e\u0301", "ñandú",
        "Straße", "İstanbul", "ΣΑΣ ΟΔΟΣ", "Ελληνικά", "Москва зимой", "ǅemal ǈ", "ﬁne ﬂour",
        "Tiếng Việt", "हिन्दी भाषा", "ภาษาไทย", "العربية", "עברית", "Ærøskøbing", "Łódź",
        "çà et là", "Ünïcödé", "ÀÉÎÕÜ", "ß ẞ", "Ⓐⓑ", "a\u0308\u0301", "\u0301 lone mark",
    ])
    add("emoji", [
        "🐶", "a dog 🐕 in the park 🌳", "❤️", "❤", "👍🏽", "👨‍👩‍👧", "🇺🇸 🇯🇵", "✨✨✨",
        "🔥 fire", "😀😃😄", "a cat 😺 with a hat 🎩", "🤖 robot", "☀️☁️🌧️", "🏳️‍🌈",
        "emoji at end 🎉", "💯", "🍕🍔🍟", "🧑‍🚀 astronaut", "♥♦♣♠", "★☆",
    ])
    add("cjk", [
        "猫", "猫の写真", "一只可爱的猫", "中文字", "고양이 사진", "東京タワーの夜景",
        "a 猫 cat", "富士山 mount fuji", "ＡＢＣ fullwidth", "、。「」", "漢字かなカナ",
        "北京烤鸭", "한국어 텍스트", "ｶﾀｶﾅ halfwidth", "日本語の文章です。", "山水画 landscape",
        "龍", "㊗️", "〜", "ㄅㄆㄇ",
    ])
    add("whitespace", [
        "a\tb", "a\nb", "a\r\nb", "a  b", "  leading", "trailing  ", "\ta photo\n", "a\u00a0b",
        "a\u3000b", "a\u2028b", "a\u2029b", "a\u200bb", "a\ufeffb", "a\x85b", "a\x1cb\x1dc\x1ed\x1ff",
        "a\x0bb\x0cc", "a\u2009thin\u200aspace", "a\u202fnarrow", "a\u1680ogham", "multi \t\n\r  mixed",
        "word\u00a0\u00a0word", "\u00a0nbsp first", "line1\nline2\nline3", "tab\tseparated\tvalues",
        "a \u3000 b",
    ])
    add("exclamation", [
        "!", "!!", "!!!", "!!!!", "!!!!!!!!!!", "! !! !!!", "wow!!!", "hello! world!", "!sks!",
        "a!b", "!\u0301", "e!\u0301", "!!! a photo !!!", "great!", "!?", "?!", "¡hola!",
        "！fullwidth", "sks!", "a dog!" * 3,
    ])
    add("special_tokens", [
        "<|startoftext|>", "<|endoftext|>", "<|startoftext|>a photo<|endoftext|>",
        "a<|endoftext|>b", "hi <|ENDOFTEXT|> there", "<|StartOfText|>x", "<|endoftext|>!",
        "!<|endoftext|>", "<|endof", "< |endoftext| >", "<|<|endoftext|>|>",
        "<|endoftext|><|endoftext|>", "x<|startoftext|>", "<|startoftext|>" * 3,
        "the end <|endoftext|> of text",
    ])
    add("control", [
        "a\x00b", "\ufffd", "a\x7fb", "soft\xadhyphen", "&amp; &lt;tag&gt;", "&quot;quoted&quot;",
        "\x01\x02\x03", "bell\x07", "zero\u200dwidth\u200cjoiner", "rtl\u200fmark", "\ue000 private use",
    ])
    add("empty", ["", " ", "  ", "\t", "\n", "\t\n \r", "\u3000", "\u00a0", "\u200b", " \u2028 "])

    long_prompts = [
        " ".join(["a photo of a dog"] * 20),
        ", ".join(["masterpiece", "best quality", "highly detailed", "intricate", "sharp focus",
                   "8k", "cinematic lighting", "volumetric fog", "octane render", "unreal engine"] * 4),
        "a " * 74, "a " * 75, "a " * 76, "a " * 77, "a " * 200,
        "!" * 80, "! " * 80, "1234567890" * 10, "sks " * 100, "猫" * 100,
        "🐶" * 40, "supercalifragilisticexpialidocious " * 10,
        "The image shows a large, old, weathered wooden sailing ship with tattered sails "
        "drifting through a dense, glowing fog at dawn, surrounded by jagged black rocks, "
        "seagulls circling overhead, waves crashing against the hull, a lone lantern burning "
        "on the deck, rendered in the style of a romantic era oil painting with rich colors "
        "and dramatic chiaroscuro lighting, museum quality, extremely detailed brushwork",
    ]
    add("long", long_prompts)
    add("long", [" ".join(rng.choice(subjects + styles) for _ in range(rng.randint(40, 90)))
                 for _ in range(8)])

    # Random strings over a pool that mixes every category above.
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
            + list(" \t\n\u00a0\u3000") * 3 + list("!!!?.,;:'\"()[]{}<>|/\\-_*&^%$#@~`")
            + list("éüñçßøåœÉİΣσαжё中文字猫の한국") + ["🐶", "❤️", "👍🏽", "\u0301", "\u200b", "'s", "'ll",
                                                   "<|endoftext|>", "<|startoftext|>", "sks", "zwx"])
    fuzz = random.Random(1234)
    add("random", ["".join(fuzz.choice(pool) for _ in range(fuzz.randint(1, 60))) for _ in range(60)])
    return items


def load_folders(tmp: Path):
    folders = {}
    for name in ["sd2", "sd15", "sd2_added_tokens_decoder"]:
        folder = tmp / name
        write_tokenizer_files(folder, BPE_MERGES)
        # sd15 and sd2 are the configs sdtrain bundles for single-file bases (data/tokenizer/).
        configs = ROOT / "data" / "tokenizer" / ("sd1" if name == "sd15" else name)
        for config in (configs if name != "sd2_added_tokens_decoder" else FIXTURES / name).glob("*.json"):
            shutil.copy(config, folder / config.name)
        folders[name] = folder
    folders["demo"] = ROOT / "configs" / "demo" / "model" / "tokenizer"
    return folders


def main():
    import transformers
    from transformers import CLIPTokenizer

    items, seen = [], set()
    for category, prompt in corpus():  # random picks may repeat a prompt: keep the first
        if prompt not in seen:
            seen.add(prompt)
            items.append((category, prompt))
    prompts = [p for _, p in items]
    out = {
        "generator": "tools/make_tokenizer_fixtures.py",
        "versions": {name: importlib.metadata.version(name)
                     for name in ["transformers", "tokenizers", "diffusers"]},
        "prompts": [{"category": c, "text": p} for c, p in items],
        "folders": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in load_folders(Path(tmp)).items():
            tokenizer = CLIPTokenizer.from_pretrained(folder)
            length = tokenizer.model_max_length
            ids, decoded = [], []
            for prompt in prompts:
                plain = tokenizer(prompt, truncation=True, max_length=length).input_ids
                padded = tokenizer(prompt, padding="max_length", truncation=True,
                                   max_length=length).input_ids
                assert padded == plain + [tokenizer.pad_token_id] * (length - len(plain)), prompt
                ids.append(plain)
                decoded.append(tokenizer.decode(plain, skip_special_tokens=True))
            out["folders"][name] = {
                "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
                "pad_id": tokenizer.pad_token_id, "unk_id": tokenizer.unk_token_id,
                "model_max_length": length, "ids": ids, "decoded": decoded,
            }
            print(f"{name}: pad {tokenizer.pad_token!r} = {tokenizer.pad_token_id}, "
                  f"{len(prompts)} prompts", file=sys.stderr)
    path = FIXTURES / "reference_ids.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} (transformers {transformers.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
