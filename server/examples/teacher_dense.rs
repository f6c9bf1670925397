//! The teacher's dense outputs for given token sequences, computed by logitd's
//! own model code (no server, nothing over the wire), written to safetensors.
//!
//! ```text
//! cargo run -p logitd --example teacher_dense -- MODEL --tokens TOKENS.safetensors --out OUT.safetensors [--dense f16|f32] [--batch N]
//! cargo run -p logitd --example teacher_dense -- MODEL --tokenizer TOKENIZER.json
//! ```
//! The second form writes the tokenizer logitd uses for MODEL (read from the
//! GGUF) as a Hugging Face `tokenizer.json`, so that a Python experiment
//! tokenizes exactly as the server does, without loading the model.
//!
//! TOKENS.safetensors holds `tokens`, u32 [N, L]. OUT.safetensors gets
//! - `hidden`: f32 [N, L, H], the teacher's last hidden states (after the final
//!   norm), row t of sequence n predicting token t + 1;
//! - `head`: f32 [V, H], the LM head as the teacher applies it (read back as
//!   `Teacher::logits` of the identity, so it is exactly the matrix the teacher
//!   multiplies by); `log_softmax(hidden @ head.T)` is then the teacher's
//!   distribution, up to the summation order of the matmul;
//! - with `--dense`: `logprobs`, [N, L, V] in f16 or f32, the teacher's
//!   log-probabilities `log_softmax(Teacher::logits(hidden))` (f32 math, then
//!   rounded). Size: N·L·V·2 bytes in f16 (49152 × 2 = 96 KiB per position for
//!   SmolLM2).
//!
//! Prints one JSON line: positions, seconds for the forward (hidden states) and
//! for the dense log-probabilities. Refuses teachers with a final logit
//! soft-cap (the head would not be linear).

use std::{collections::HashMap, path::PathBuf, time::Instant};

use anyhow::{Context, bail, ensure};
use candle_core::{D, DType, Device, Tensor};
use logitd::model::{PackedBatch, Teacher};

fn main() -> anyhow::Result<()> {
    // As the `logitd` binary: freed tensor memory reused (`logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: teacher_dense MODEL (--tokens IN.safetensors --out OUT.safetensors \
                 [--dense f16|f32] [--batch N] | --tokenizer OUT.json)";
    ensure!(!args.is_empty(), "{usage}");
    let model = PathBuf::from(&args[0]);
    let (mut input, mut output, mut tokenizer_out) = (None, None, None);
    let (mut dense, mut batch) = (None, 8usize);
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        let mut value = || rest.next().with_context(|| format!("{a} needs a value; {usage}"));
        match a.as_str() {
            "--tokens" => input = Some(PathBuf::from(value()?)),
            "--out" => output = Some(PathBuf::from(value()?)),
            "--tokenizer" => tokenizer_out = Some(PathBuf::from(value()?)),
            "--dense" => {
                dense = Some(match value()?.as_str() {
                    "f16" => DType::F16,
                    "f32" => DType::F32,
                    other => bail!("--dense takes f16 or f32, got {other:?}"),
                })
            }
            "--batch" => batch = value()?.parse()?,
            other => bail!("unknown argument {other:?}; {usage}"),
        }
    }
    ensure!(batch > 0, "--batch must be positive, got {batch}");
    if let Some(path) = tokenizer_out {
        let tokenizer = logitd::model::load_tokenizer(&model, None)?;
        tokenizer
            .save(&path, false)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        return Ok(());
    }
    let (Some(input), Some(output)) = (input, output) else { bail!("{usage}") };

    let device = Device::Cpu;
    let tensors = candle_core::safetensors::load(&input, &device)
        .with_context(|| format!("reading {}", input.display()))?;
    let tokens = tensors.get("tokens").context("no `tokens` tensor in the input")?;
    ensure!(tokens.dtype() == DType::U32, "`tokens` must be u32, got {:?}", tokens.dtype());
    let (n, len) = tokens.dims2().context("`tokens` must be [N, L]")?;
    let tokens: Vec<Vec<u32>> = tokens.to_vec2()?;

    let teacher = Teacher::load(&model, &device, DType::F32)?;
    ensure!(
        teacher.config().final_softcap.is_none(),
        "this teacher soft-caps its logits; its head is not linear"
    );
    let h = teacher.config().hidden_size;
    let head = teacher.logits(&Tensor::eye(h, DType::F32, &device)?)?.t()?.contiguous()?;

    let (mut forward_s, mut dense_s) = (0.0, 0.0);
    let (mut hidden, mut logprobs) = (Vec::new(), Vec::new());
    for chunk in tokens.chunks(batch) {
        let t = Instant::now();
        let hs = teacher.hidden_states(&PackedBatch::new(chunk)?)?;
        forward_s += t.elapsed().as_secs_f64();
        if let Some(dtype) = dense {
            let t = Instant::now();
            let lp = candle_nn::ops::log_softmax(&teacher.logits(&hs)?, D::Minus1)?;
            logprobs.push(lp.to_dtype(dtype)?);
            dense_s += t.elapsed().as_secs_f64();
        }
        hidden.push(hs);
    }
    let mut out = HashMap::new();
    out.insert("hidden".to_string(), Tensor::cat(&hidden, 0)?.reshape((n, len, h))?);
    out.insert("head".to_string(), head);
    if dense.is_some() {
        let v = teacher.config().vocab_size;
        out.insert("logprobs".to_string(), Tensor::cat(&logprobs, 0)?.reshape((n, len, v))?);
    }
    candle_core::safetensors::save(&out, &output)
        .with_context(|| format!("writing {}", output.display()))?;
    println!(
        "{{\"positions\": {}, \"forward_s\": {forward_s:.3}, \"dense_s\": {dense_s:.3}, \"threads\": {}}}",
        n * len,
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
