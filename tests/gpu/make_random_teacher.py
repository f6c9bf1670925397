"""Random-weight teachers for the GPU benchmarks, shaped like Gemma-3-1B,
Gemma-3-4B (its language model) and Llama-3-8B, written as Hugging Face
directories (config.json + bf16 safetensors) that both logitd and transformers
load. The weights are transformers' own random initialisation, made on the GPU
when there is one; nothing is downloaded.

    python tests/gpu/make_random_teacher.py OUT_DIR [--only gemma3-1b,llama3-8b] [--tiny]

--tiny shrinks every dimension (same structure) to check the script and the
loaders on a machine without a GPU.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

SHAPES = {
    # google/gemma-3-1b-pt
    "gemma3-1b": lambda: Gemma3TextConfig(
        vocab_size=262_144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True,
    ),
    # the language model of google/gemma-3-4b-pt
    "gemma3-4b": lambda: Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131_072,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": lambda: LlamaConfig(
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
    ),
}

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, vocab_size=1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", default=",".join(SHAPES))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in a.only.split(","):
        out = Path(a.out) / name
        if (out / "config.json").exists():
            print(f"{out}: exists", file=sys.stderr)
            continue
        cfg = SHAPES[name]()
        if a.tiny:
            for k, v in TINY.items():
                setattr(cfg, k, v)
            cfg.num_attention_heads = min(cfg.num_attention_heads, 4)
            cfg.num_key_value_heads = min(cfg.num_key_value_heads, 2)
            if getattr(cfg, "head_dim", None):
                cfg.head_dim = 16
            if hasattr(cfg, "layer_types") and cfg.layer_types:
                cfg.layer_types = cfg.layer_types[:3]
        torch.manual_seed(a.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        (out / "GENERATED.json").write_text(
            json.dumps(
                {
                    "generator": "tests/gpu/make_random_teacher.py",
                    "shape": name,
                    "tiny": a.tiny,
                    "seed": a.seed,
                    "parameters": params,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "device": device,
                },
                indent=2,
            )
        )
        print(f"{out}: {params / 1e9:.2f} B parameters", file=sys.stderr)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
