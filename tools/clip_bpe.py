"""CLIP byte-level BPE files (vocab.json + merges.txt) derived from the CLIP merge list.

The vocabulary is fully determined by the merges (docs/tokenizer.md, step 4):
256 byte symbols, the same with "</w>", one entry per merge, then <|startoftext|> and
<|endoftext|>. `num_merges` truncates the merge list, which gives a small but genuine CLIP
tokenizer for tiny test models.
"""
import json
from pathlib import Path

FULL_MERGE_COUNT = 49152 - 256 - 2


def bytes_to_unicode():
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def read_merges(merges_txt: Path, num_merges: int = FULL_MERGE_COUNT):
    """data/clip/merges.txt: "#version: 0.2", then one merge per line."""
    lines = merges_txt.read_text(encoding="utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:1 + min(num_merges, FULL_MERGE_COUNT)]]


def write_tokenizer_files(out_dir: Path, merges_txt: Path, num_merges: int = FULL_MERGE_COUNT):
    """Writes vocab.json and merges.txt as a Stable Diffusion tokenizer/ folder has them."""
    merges = read_merges(merges_txt, num_merges)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)
