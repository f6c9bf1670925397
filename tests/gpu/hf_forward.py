"""Hugging Face transformers' forward of a teacher directory on the GPU in
bf16 (SDPA attention), on SEQUENCES x LENGTH random tokens, the peer of
`gpu_bench forward`: tokens/s to the hidden states, and to the logits of every
position plus sampling them as torch_sampler.py does (softmax, multinomial
k = 256 with replacement, counts, log p, to the host), with the LM head and the
sampling in row chunks of about 256 Mi logits, as logitd runs them on a GPU
(all logits at once do not fit in memory for long batches).

    python tests/gpu/hf_forward.py MODEL_DIR SEQUENCES LENGTH REPS
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from torch_sampler import sample  # noqa: E402


def main():
    model_dir, sequences, length, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to("cuda").eval()
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator(device="cuda").manual_seed(3)
    ids = torch.randint(0, vocab, (sequences, length), device="cuda", generator=g)
    chunk = max(1, (1 << 28) // vocab)
    head = model.get_output_embeddings()

    def hidden():
        return model.model(input_ids=ids).last_hidden_state

    def full():
        h = hidden().reshape(-1, model.config.get_text_config().hidden_size)
        for i in range(0, h.shape[0], chunk):
            logits = head(h[i : i + chunk])
            cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            sample(logits, 256)

    with torch.inference_mode():
        for f in (hidden, full):
            f()
        torch.cuda.synchronize()
        out = {}
        for label, f in (("forward", hidden), ("forward_head_sample", full)):
            t = time.perf_counter()
            for _ in range(reps):
                f()
            torch.cuda.synchronize()
            out[label] = sequences * length * reps / (time.perf_counter() - t)
    print(json.dumps({
        "bench": "hf_forward", "device": torch.cuda.get_device_name(0), "model": Path(model_dir).name,
        "sequences": sequences, "length": length,
        "tokens_per_s_forward": out["forward"], "tokens_per_s_forward_head_sample": out["forward_head_sample"],
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
