"""Write a tiny random-init Llama plus a character-level tokenizer for the local RL demo.

The model is a transformers LlamaForCausalLM saved with save_pretrained (safetensors, fp32). The
tokenizer is a character-level BPE with no merges (every character is one token), built with the
`tokenizers` library and saved as tokenizer.json, so both HF AutoTokenizer and the Rust `tokenizers`
crate (0.23, no regex features needed) load it. It has a Fuse decoder, so decode(encode(text)) ==
text exactly, and a chat template in tokenizer_config.json for Atropos' ManagedServer, which calls
apply_chat_template.

Vocabulary (ids in this order; vocab_size of the model == tokenizer size):
    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>   4 '>' (user turn)   5 '=' (assistant turn)
    6.. the task symbols (--symbols, default "abcd")
Chat rendering (ChatML-like: every turn ends with </s>):
    <s> '>' user-text </s> '=' assistant-text </s> ...  and a trailing '=' as the generation prompt.
A user message "abca" therefore becomes ids [1, 4, 6, 7, 8, 6, 2, 5] and the model answers after '='.
System messages render like user messages. Characters outside the vocabulary encode to <unk>.
Ending the user turn with </s> means that in the copy task the token a fixed distance back from
the answer's end is </s>: "copy the token at a fixed offset" then also stops at the right place.

A small vocabulary is deliberate: the fewer tokens a random policy can emit, the sooner RL finds
reward (python/envs/copy_env.py's task uses exactly these symbols).

    python python/tools/make_demo_model.py --out /tmp/demo-model            # default sizes
    python python/tools/make_demo_model.py --out DIR --seed 1 --hidden 64 --layers 2 --symbols abcdef
"""
import argparse
import json
import os

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TURN_MARKERS = [">", "="]

# Jinja, rendered by transformers' apply_chat_template. Kept to the markers above so every
# character it emits is in the vocabulary.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}={% else %}>{% endif %}"
    "{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)


def build_vocab(symbols):
    chars = TURN_MARKERS + list(symbols)
    if len(set(chars)) != len(chars):
        raise SystemExit(f"--symbols must be distinct characters and not contain {TURN_MARKERS}")
    return {tok: i for i, tok in enumerate(SPECIALS + chars)}


def save_tokenizer(out, symbols):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = build_vocab(symbols)
    # BPE with an empty merge list = one token per character; no pre-tokenizer and no normalizer,
    # so nothing is split, lower-cased or stripped, and no regex support is needed to load it.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # concatenate tokens; the default would join them with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,  # the chat template writes <s> itself; there is no post-processor
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, f, indent=2)
    return vocab


def check_tokenizer(out, vocab, symbols):
    """Round-trip the saved files through AutoTokenizer and the raw tokenizers library."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    text = symbols[::-1] + symbols
    msgs = [{"role": "user", "content": text}]
    prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = hf.encode(prompt, add_special_tokens=True)
    want = [vocab["<s>"], vocab[">"]] + [vocab[c] for c in text] + [vocab["</s>"], vocab["="]]
    assert ids == want, (prompt, ids, want)
    assert raw.encode(prompt, add_special_tokens=True).ids == want
    answer = [vocab[c] for c in text] + [vocab["</s>"]]
    assert hf.decode(answer, skip_special_tokens=True) == text
    assert raw.decode(answer, skip_special_tokens=True) == text
    assert hf.eos_token_id == vocab["</s>"] and hf.bos_token_id == vocab["<s>"]
    assert len(hf) == len(vocab), (len(hf), len(vocab))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--symbols", default="abcd", help="task alphabet, one character per symbol")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range")
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(args.out, exist_ok=True)
    vocab = save_tokenizer(args.out, args.symbols)
    check_tokenizer(args.out, vocab, args.symbols)

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate, max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=args.init_std,
        tie_word_embeddings=args.tie, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"], torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(args.out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/"
          f"{args.kv_heads} ffn={args.intermediate} vocab={len(vocab)} params={n}")


if __name__ == "__main__":
    main()
