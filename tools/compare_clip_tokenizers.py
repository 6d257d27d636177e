"""Compares other CLIP tokenizers with the committed reference ids (docs/tokenizer.md).

The reference (tests/fixtures/tokenizer/reference_ids.json) is transformers' CLIPTokenizer at
the pinned version. This script tokenizes the same corpus with whatever the running Python
has, and prints per category how many prompts get different ids, with examples:
  --impl transformers   CLIPTokenizer (and CLIPTokenizerFast) of the installed transformers,
                        e.g. a 4.x in a scratch venv: pip install "transformers<5"
  --impl open_clip      open_clip's SimpleTokenizer (what SD 2 was trained with; pads with 0)

Not part of the tests: the pinned environment has neither transformers 4 nor open_clip.
"""
import argparse
import importlib.metadata
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_fixtures import FIXTURES, load_folders  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["transformers", "open_clip"], required=True)
    parser.add_argument("--examples", type=int, default=3)
    args = parser.parse_args()
    ref = json.loads((FIXTURES / "reference_ids.json").read_text(encoding="utf-8"))
    prompts = ref["prompts"]

    with tempfile.TemporaryDirectory() as tmp:
        folders = load_folders(Path(tmp))
        runs = []
        if args.impl == "transformers":
            import transformers
            from transformers import CLIPTokenizer, CLIPTokenizerFast
            for name in ["sd2", "sd15"]:
                for cls in [CLIPTokenizer, CLIPTokenizerFast]:
                    tok = cls.from_pretrained(folders[name])
                    label = f"transformers {transformers.__version__} {cls.__name__} ({name})"
                    runs.append((label, name, lambda p, tok=tok: tok(
                        p, truncation=True, max_length=tok.model_max_length).input_ids))
        else:
            # Only open_clip/tokenizer.py is needed (the package __init__ wants torchvision).
            import importlib.util
            spec = importlib.util.find_spec("open_clip")
            path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
            module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
            open_clip = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(open_clip)
            open_clip.__version__ = importlib.metadata.version("open_clip_torch")
            tok = open_clip.SimpleTokenizer()  # ViT-H-14 (SD 2's text encoder) uses this one

            def encode(p):
                ids = tok([p])[0].tolist()  # padded with 0 to 77, truncated with eos kept
                while ids and ids[-1] == 0:
                    ids.pop()
                return ids
            runs.append((f"open_clip {open_clip.__version__} SimpleTokenizer (vs sd2)", "sd2", encode))

        for label, name, encode in runs:
            expected = ref["folders"][name]["ids"]
            per_category = collections.Counter(p["category"] for p in prompts)
            differ = collections.Counter()
            examples = collections.defaultdict(list)
            for prompt, want in zip(prompts, expected):
                got = encode(prompt["text"])
                if got != want:
                    differ[prompt["category"]] += 1
                    if len(examples[prompt["category"]]) < args.examples:
                        examples[prompt["category"]].append((prompt["text"], want, got))
            total = sum(differ.values())
            print(f"\n## {label}: {total} of {len(prompts)} prompts differ from the reference")
            for category in per_category:
                if differ[category]:
                    print(f"- {category}: {differ[category]}/{per_category[category]}")
                    for text, want, got in examples[category]:
                        print(f"    {json.dumps(text, ensure_ascii=False)[:70]}\n"
                              f"      reference {want[:14]}\n      other     {got[:14]}")


if __name__ == "__main__":
    main()
