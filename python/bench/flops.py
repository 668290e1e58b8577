"""Shared FLOP accounting and the model-shape table for the learner benchmarks.

The Rust side uses the same formula, so the two MFU figures are comparable:

    model_flops(shape, seq_lens) = 6 * matmul_params(shape) * sum(l)
                                 + 6 * layers * (num_heads * head_dim) * sum(l * l)

* 6 * P * tokens: forward 2*P FLOPs per token through every matmul weight, backward 4*P.
* Causal attention per layer and sequence of length l, with d = num_heads * head_dim:
  forward QK^T is 2*l*l*d FLOPs for the full square, half of it under the causal mask, so l*l*d;
  A@V likewise l*l*d; forward = 2*l*l*d, training (forward + 2x backward) = 6*l*l*d.
* Activation recomputation (gradient checkpointing) is NOT counted: this is model FLOPs, not
  hardware FLOPs. Norms, RoPE, softmax, the loss and the embedding lookup are not counted.

`seq_lens` are the lengths the model actually runs on per sequence (the benchmarks pass
len(tokens) - 1, the unpadded model input length).

CLI: `python flops.py` prints the shape table's parameter counts; `python flops.py --peak`
also measures the bf16 matmul peak on CUDA.
"""
import argparse
import json
import statistics

# Public config.json values of Qwen/Qwen2.5-0.5B, -1.5B and -7B (base models).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       max_position_embeddings=32768),
}


def tiny_shape(vocab):
    """A CPU smoke-test shape (not in SHAPES because its vocab comes from the batch file)."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=int(vocab), rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768)


def _shape(shape):
    return SHAPES[shape] if isinstance(shape, str) else shape


def head_dim(shape):
    s = _shape(shape)
    return s.get("head_dim") or s["hidden_size"] // s["num_attention_heads"]


def matmul_params(shape):
    """Weights that go through a matmul: q/k/v/o and gate/up/down of every layer, plus lm_head
    (counted once, also when tied to the embedding). Biases, norms and the embedding lookup excluded."""
    s = _shape(shape)
    h, hd = s["hidden_size"], head_dim(s)
    q = s["num_attention_heads"] * hd
    kv = s["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * s["intermediate_size"]
    return s["num_hidden_layers"] * per_layer + h * s["vocab_size"]


def model_flops(shape, seq_lens):
    """6 * matmul_params * sum(l) + 6 * layers * (num_heads * head_dim) * sum(l * l).

    Training FLOPs (forward + backward, no recomputation) of one step over sequences of the given
    lengths, each run on its own causal attention (see the module docstring for the derivation)."""
    s = _shape(shape)
    lens = [int(l) for l in seq_lens]
    d = s["num_attention_heads"] * head_dim(s)
    return (6 * matmul_params(s) * sum(lens)
            + 6 * s["num_hidden_layers"] * d * sum(l * l for l in lens))


def measure_bf16_peak(device="cuda", n=8192, iters=20, warmup=5):
    """Median TFLOP/s of a bf16 n x n x n torch.matmul (random inputs), timed with CUDA events."""
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(warmup):
        c = torch.matmul(a, b)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        c = torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    del c
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peak", action="store_true", help="measure the bf16 matmul peak (CUDA)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    out = {name: {"matmul_params": matmul_params(name), "head_dim": head_dim(name)} for name in SHAPES}
    if args.peak:
        out["bf16_peak_tflops"] = measure_bf16_peak(args.device)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
