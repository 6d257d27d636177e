"""Tabulates a Chrome trace of training steps (SDTRAIN_PROFILE, include/sdtrain/train/step_profiler.h).

Prints Markdown: the window's span, how long the GPU was busy (kernels, copies and memsets,
overlaps merged), kernel time by kind, the most expensive kernels, the CUDA runtime calls the
host made (launches, synchronisations, copies) and the slowest CPU operators, each per step.
Only the standard library; runs where the trace is.

    python tools/summarize_trace.py TRACE.json --steps 5
"""
import argparse
import collections
import json
import re

KINDS = [  # first match wins
    ("optimizer (8-bit AdamW)", r"adam"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|cudnn"),
    ("attention", r"flash|fmha|attention|sdpa|mem_eff"),
    ("matmul", r"gemm|cutlass|cublas|xmma|sm90|sm80"),
    ("normalisation", r"norm"),
    ("reduction", r"reduce|sum_|norm_kernel"),
    ("copy / cast", r"copy|cast|to_"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def kind_of(name):
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def merged_length(intervals):
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def table(title, rows, steps, header="calls/step"):
    print(f"\n**{title}** (per step)\n")
    print(f"| name | {header} | ms/step |")
    print("|---|---|---|")
    for name, (count, micros) in rows:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {count / steps:.1f} | {micros / steps / 1000:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    events = [e for e in json.load(open(args.trace))["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    busy = merged_length([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    steps = args.steps
    print(f"Window: {span / steps / 1000:.1f} ms/step; GPU busy {busy / steps / 1000:.1f} ms/step "
          f"({100 * busy / span:.0f}%), idle {(span - busy) / steps / 1000:.1f} ms/step; "
          f"{sum(e.get('cat') == 'kernel' for e in gpu) / steps:.0f} kernels/step")

    def grouped(selected, key):
        totals = collections.defaultdict(lambda: [0, 0.0])
        for e in selected:
            totals[key(e)][0] += 1
            totals[key(e)][1] += e["dur"]
        return sorted(totals.items(), key=lambda item: -item[1][1])

    table("GPU time by kind", grouped(gpu, lambda e: e["cat"] if e["cat"] != "kernel" else kind_of(e["name"])),
          steps, "kernels/step")
    table("Most expensive kernels", grouped([e for e in gpu if e["cat"] == "kernel"], lambda e: e["name"])[:args.top],
          steps)
    table("CUDA runtime calls", grouped([e for e in events if e.get("cat") == "cuda_runtime"],
                                         lambda e: e["name"])[:args.top], steps)
    table("CPU operators (inclusive time)", grouped([e for e in events if e.get("cat") == "cpu_op"],
                                                     lambda e: e["name"])[:args.top], steps)


if __name__ == "__main__":
    main()
