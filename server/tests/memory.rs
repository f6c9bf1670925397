//! Memory at load, measured: a GGUF teacher kept quantized (`--dtype auto`)
//! loads and scores without an f32-sized copy of its weights, even for a
//! moment. `logitd sample` runs in a child process; its peak resident set
//! (VmHWM, which covers every transient allocation and the pages of mapped
//! files) is compared with the file's size.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// Runs `logitd sample` on `model` with `--dtype dtype` over a 64-token
/// sequence (ids below 300: every fixture has them); its peak RSS in bytes,
/// as it logs it at the end (VmHWM: the peak of its own address space, from
/// exec to after the forward and sampling). Not wait4's ru_maxrss: on Linux
/// a spawned child execs from its parent's address space, and ru_maxrss
/// then carries the parent's peak (this test binary's, with whatever the
/// tests beside it loaded): 563 MiB read for a 307 MiB child.
fn peak_rss(model: &Path, dtype: &str) -> u64 {
    let tokens: Vec<String> = (0..64u32).map(|i| (1 + i * 37 % 300).to_string()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_logitd"))
        .args(["sample", "--model"])
        .arg(model)
        .args(["--dtype", dtype, "--tokens", &tokens.join(","), "--num-samples", "256"])
        .args(["--log", "info"])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("running logitd");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "logitd sample --dtype {dtype} on {} failed ({}): {log}",
        model.display(),
        out.status
    );
    let peak = log
        .lines()
        .find_map(|l| l.split("peak_rss_bytes=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    peak.unwrap_or_else(|| panic!("no peak_rss_bytes in the log: {log}"))
}

fn smollm2() -> PathBuf {
    let path = logitd::model::cache_dir().join("teachers/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run tests/fetch-teachers.sh all", path.display());
    path
}

const MIB: u64 = 1 << 20;

/// The process without the teacher: the same command on a tiny fixture model
/// (a few hundred kB of weights) gives what the binary, its thread pools and
/// a 64-token forward take. SmolLM2 kept quantized must fit in that plus 1.2×
/// its file plus 64 MiB: the logits (64 × 49,152 f32, 12 MiB), a layer's
/// activations at 64 tokens, and the one tensor at a time that is briefly
/// held twice while it is read (the 29 MiB Q8_0 embedding at most). Widened to
/// f32 (4 bytes × 135M parameters ≈ 5.5× the file) it must not fit, which
/// shows the bound can fail. Measured on the development machine: base 13
/// MiB, kept quantized 153 MiB, widened 571 MiB, bound 190 MiB.
#[test]
fn a_quantized_teacher_loads_without_an_f32_copy() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama_q4_0.gguf");
    let base = peak_rss(&tiny, "auto");
    let model = smollm2();
    let file = std::fs::metadata(&model).unwrap().len();
    let bound = base + file * 6 / 5 + 64 * MIB;
    let quantized = peak_rss(&model, "auto");
    let widened = peak_rss(&model, "f32");
    eprintln!(
        "peak RSS: base {} MiB; SmolLM2 Q4_1 ({} MiB file) kept quantized {} MiB, widened to \
         f32 {} MiB; bound {} MiB",
        base / MIB,
        file / MIB,
        quantized / MIB,
        widened / MIB,
        bound / MIB
    );
    assert!(quantized <= bound, "kept quantized: peak {quantized} B > bound {bound} B");
    assert!(widened > bound, "widened to f32: peak {widened} B within the bound {bound} B");
}

/// A Hugging Face directory of SmolLM2-135M's shapes (Llama, hidden 576, 30
/// layers, vocabulary 49,152, tied embedding) in bf16, written into `dir`:
/// about 270 MB. The values are constant (memory does not depend on them).
fn write_bf16_smollm2_shape(dir: &Path) {
    use candle_core::{Device, Tensor};
    std::fs::create_dir_all(dir).unwrap();
    let (h, inter, layers, vocab, heads, kv) = (576, 1536, 30, 49_152, 9, 3);
    let hd = h / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": true, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let m =
        |shape: &[usize]| Tensor::full(half::bf16::from_f32(0.01), shape, &Device::Cpu).unwrap();
    let mut t = std::collections::HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), m(&[vocab, h]));
    t.insert("model.norm.weight".to_string(), m(&[h]).ones_like().unwrap());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", [heads * hd, h]),
            ("self_attn.k_proj", [kv * hd, h]),
            ("self_attn.v_proj", [kv * hd, h]),
            ("self_attn.o_proj", [h, heads * hd]),
            ("mlp.gate_proj", [inter, h]),
            ("mlp.up_proj", [inter, h]),
            ("mlp.down_proj", [h, inter]),
        ] {
            t.insert(format!("{p}.{name}.weight"), m(&shape));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{norm}.weight"), m(&[h]).ones_like().unwrap());
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// As above for a bf16 safetensors checkpoint kept as stored (`--dtype auto`
/// on the CPU): its matrices are used where the file is mapped, so the peak
/// is the file's pages plus the base, a 64-token forward and the logits.
/// Widened to f32 it takes the file's pages and twice their size again, and
/// must break the bound.
#[test]
fn a_bf16_checkpoint_loads_without_an_f32_copy() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama_q4_0.gguf");
    let base = peak_rss(&tiny, "auto");
    let dir = std::env::temp_dir().join(format!("logitd-memory-bf16-{}", std::process::id()));
    write_bf16_smollm2_shape(&dir);
    let file = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
    let bound = base + file * 6 / 5 + 64 * MIB;
    let kept = peak_rss(&dir, "auto");
    let widened = peak_rss(&dir, "f32");
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!(
        "peak RSS: base {} MiB; SmolLM2-shaped bf16 ({} MiB file) kept {} MiB, widened to f32 \
         {} MiB; bound {} MiB",
        base / MIB,
        file / MIB,
        kept / MIB,
        widened / MIB,
        bound / MIB
    );
    assert!(kept <= bound, "kept bf16: peak {kept} B > bound {bound} B");
    assert!(widened > bound, "widened to f32: peak {widened} B within the bound {bound} B");
}
