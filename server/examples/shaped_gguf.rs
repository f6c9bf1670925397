//! Writes a GGUF file shaped like a real teacher, with random weights, for
//! memory and speed measurements only (its outputs mean nothing; correctness
//! is tested on the real small teachers and the fixtures).
//!
//! ```text
//! cargo run --release -p logitd --example shaped_gguf -- OUT.gguf [SHAPE] [LAYERS]
//! ```
//! SHAPE: `llama3-8b` (default; Llama 3.1 8B: hidden 4096, 32 layers, 32/8
//! heads, MLP 14336, vocabulary 128256) or `llama3-1b` (Llama 3.2 1B). LAYERS
//! overrides the layer count (a shorter file of the same width).
//!
//! Tensor types follow llama.cpp's Q4_K_M: Q4_K for the embedding and most
//! matrices, Q6_K for the output, and for attn_v and ffn_down in every other
//! layer (llama.cpp picks "half" of them; which half does not change memory or
//! speed); norms F32. The tokenizer is a placeholder vocabulary. The weights are N(0, 0.02) values quantized by candle:
//! to keep the run short, a pool of 4M random values is quantized once per
//! type and its blocks are repeated to fill each tensor.

use std::{fs::File, io::BufWriter, path::PathBuf};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file},
};

struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    rope_theta: f32,
}

const POOL: usize = 1 << 22;

/// `rows` × `cols` of `dtype`, blocks repeated from `pool`.
fn tensor(pool: &QTensor, rows: usize, cols: usize) -> anyhow::Result<QTensor> {
    let dtype = pool.dtype();
    let src = pool.data()?;
    let len = rows * cols / dtype.block_size() * dtype.type_size();
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        let take = (len - bytes.len()).min(src.len());
        bytes.extend_from_slice(&src[..take]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bytes),
        &Device::Cpu,
        dtype,
    )?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first().ok_or_else(|| anyhow::anyhow!("usage: OUT.gguf [SHAPE] [LAYERS]"))?,
    );
    let mut s = match args.get(1).map_or("llama3-8b", String::as_str) {
        "llama3-8b" => Shape {
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            ffn: 14336,
            vocab: 128_256,
            rope_theta: 500_000.0,
        },
        "llama3-1b" => Shape {
            hidden: 2048,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            ffn: 8192,
            vocab: 128_256,
            rope_theta: 500_000.0,
        },
        other => anyhow::bail!("unknown shape {other} (llama3-8b, llama3-1b)"),
    };
    if let Some(l) = args.get(2) {
        s.layers = l.parse()?;
    }
    let values = Tensor::randn(0f32, 0.02, POOL, &Device::Cpu)?;
    let q4k = QTensor::quantize(&values, GgmlDType::Q4K)?;
    let q6k = QTensor::quantize(&values, GgmlDType::Q6K)?;
    let ones = Tensor::ones(s.hidden, candle_core::DType::F32, &Device::Cpu)?;
    let norm = || QTensor::quantize(&ones, GgmlDType::F32);
    let (h, hd) = (s.hidden, s.hidden / s.heads);
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), tensor(&q4k, s.vocab, h)?),
        ("output.weight".into(), tensor(&q6k, s.vocab, h)?),
        ("output_norm.weight".into(), norm()?),
    ];
    for i in 0..s.layers {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        let heavy = if i % 2 == 0 { &q6k } else { &q4k };
        for (name, q, rows, cols) in [
            ("attn_q", &q4k, s.heads * hd, h),
            ("attn_k", &q4k, s.kv_heads * hd, h),
            ("attn_v", heavy, s.kv_heads * hd, h),
            ("attn_output", &q4k, h, s.heads * hd),
            ("ffn_gate", &q4k, s.ffn, h),
            ("ffn_up", &q4k, s.ffn, h),
            ("ffn_down", heavy, h, s.ffn),
        ] {
            tensors.push((b(name), tensor(q, rows, cols)?));
        }
        for name in ["attn_norm", "ffn_norm"] {
            tensors.push((b(name), norm()?));
        }
    }
    use gguf_file::Value;
    let u = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "general.name",
            Value::String("random weights, Llama 3 shaped (logitd shaped_gguf)".into()),
        ),
        ("llama.embedding_length", u(h)),
        ("llama.block_count", u(s.layers)),
        ("llama.attention.head_count", u(s.heads)),
        ("llama.attention.head_count_kv", u(s.kv_heads)),
        ("llama.feed_forward_length", u(s.ffn)),
        ("llama.context_length", u(8192)),
        ("llama.rope.freq_base", Value::F32(s.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        // A placeholder SentencePiece vocabulary (`<0>` … ), so that llama.cpp
        // loads the file too; logitd's forward needs none.
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array((0..s.vocab).map(|i| Value::String(format!("<{i}>"))).collect()),
        ),
        ("tokenizer.ggml.scores", Value::Array(vec![Value::F32(0.0); s.vocab])),
        (
            "tokenizer.ggml.token_type",
            Value::Array((0..s.vocab).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut w = BufWriter::new(File::create(&out)?);
    gguf_file::write(&mut w, &meta, &refs)?;
    let bytes: usize = tensors.iter().map(|(_, t)| t.storage_size_in_bytes()).sum();
    println!(
        "{}: {} tensors, {:.2} GiB of weights",
        out.display(),
        tensors.len(),
        bytes as f64 / f64::from(1u32 << 30)
    );
    Ok(())
}
