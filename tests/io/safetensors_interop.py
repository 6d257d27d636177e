"""Reference side of the safetensors interop test.

    safetensors_interop.py write PATH   writes the pattern with Python's safetensors
    safetensors_interop.py check PATH   checks a file sdtrain wrote holds the same pattern

Both sides build tensor k of each dtype as ((arange(n) * 7 + k) % 23 - 11) cast to the dtype,
with shape [2, n/2] (bool: value > 0), so neither side needs the other's file to know the truth.
"""
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
          "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
          "u8": torch.uint8, "bool": torch.bool, "f8e4m3": torch.float8_e4m3fn, "f8e5m2": torch.float8_e5m2}


def pattern():
    tensors = {}
    for k, (name, dtype) in enumerate(DTYPES.items()):
        values = (torch.arange(10) * 7 + k) % 23 - 11
        if dtype == torch.uint8:
            values = values + 11
        tensors[name] = (values > 0) if dtype == torch.bool else values.to(torch.float32).to(dtype)
        tensors[name] = tensors[name].reshape(2, 5)
    return tensors


def main():
    mode, path = sys.argv[1], sys.argv[2]
    expected = pattern()
    if mode == "write":
        save_file(expected, path, metadata={"format": "pt", "writer": "python"})
        return
    loaded = load_file(path)
    assert set(loaded) == set(expected), (sorted(loaded), sorted(expected))
    for name, tensor in expected.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, (name, got.dtype, got.shape)
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
    with safe_open(path, "pt") as f:
        assert f.metadata().get("format") == "pt", f.metadata()
    print("interop ok:", len(loaded), "tensors")


if __name__ == "__main__":
    main()
