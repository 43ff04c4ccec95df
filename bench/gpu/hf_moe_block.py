#!/usr/bin/env python3
"""Times Hugging Face transformers' own sparse MoE block on the GPU (bf16), the reference users would
run instead of Switchyard, at the shapes bench_gpu_moe measures; writes {"<shape>/<tokens>": ms}.

Runs where PyTorch and transformers are installed (the GPU machine). Median of --reps after warm-up,
timed with CUDA events; several input sets rotated so no run reuses a cached input.
"""
import argparse
import json
import sys

import torch


def make_block(name, hidden, ffn, experts, top_k):
    if name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                            num_experts_per_tok=top_k)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts,
                             num_experts_per_tok=top_k, norm_topk_prob=True)
    # transformers 5 picks the experts' kernel by this attribute; older versions ignore it.
    for attr in ("experts_implementation", "_experts_implementation"):
        try:
            setattr(cfg, attr, "grouped_mm")
        except Exception:
            pass
    block = Block(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def time_block(block, hidden, tokens, reps):
    xs = [torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        for i in range(5):
            block(xs[i % 3])
        torch.cuda.synchronize()
        times = []
        for i in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            block(xs[i % 3])
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    result = {}
    for name, hidden, ffn, experts, top_k in (("mixtral", 4096, 14336, 8, 2), ("qwen3", 2048, 768, 128, 8)):
        try:
            block = make_block(name, hidden, ffn, experts, top_k)
        except Exception as e:  # report and go on: the C++ benchmark still runs
            print(f"{name}: cannot build transformers' block: {e}", file=sys.stderr)
            continue
        for t in (1, 8, 64, 512, 4096):
            ms = time_block(block, hidden, t, args.reps)
            result[f"{name}/{t}"] = ms
            print(f"HF {name:8s} {t:5d} tokens: {ms:.3f} ms")
        del block
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
