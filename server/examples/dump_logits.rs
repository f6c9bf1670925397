//! Writes a real teacher's logits to a safetensors file (`logits`, [rows, V]),
//! for the GPU test of the sampling kernel on real-teacher logits
//! (`LOGITD_REAL_LOGITS`, see tests/gpu/README.md).
//!
//! ```text
//! dump_logits MODEL FIXTURE.json OUT.safetensors [ROWS] [bf16|f32]
//! ```
//!
//! Runs the teacher on the CPU in f32 over the token ids of the sentences in a
//! real-teacher fixture (`server/tests/fixtures/real/*.json`, field
//! `sentences[].token_ids`) and keeps the logits of the first ROWS positions
//! (default all), in bf16 (default, half the bytes) or f32.

use std::{collections::HashMap, path::Path};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use logitd::model::{PackedBatch, Teacher};

fn main() -> anyhow::Result<()> {
    // As the `logitd` binary: freed tensor memory reused (`logitd::malloc`).
    logitd::malloc::keep_tensor_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: dump_logits MODEL FIXTURE.json OUT.safetensors [ROWS] [bf16|f32]");
    }
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&args[1]).with_context(|| format!("reading {}", args[1]))?,
    )?;
    let sequences: Vec<Vec<u32>> = fixture["sentences"]
        .as_array()
        .context("the fixture has no `sentences`")?
        .iter()
        .map(|s| {
            s["token_ids"]
                .as_array()
                .map(|ids| ids.iter().filter_map(|t| t.as_u64().map(|t| t as u32)).collect())
                .context("a sentence has no `token_ids`")
        })
        .collect::<anyhow::Result<_>>()?;
    let teacher = Teacher::load(Path::new(&args[0]), &Device::Cpu, DType::F32)?;
    let batch = PackedBatch::new(&sequences)?;
    let logits = teacher.logits(&teacher.hidden_states(&batch)?)?;
    let rows = match args.get(3) {
        Some(r) => r.parse::<usize>()?.min(batch.num_tokens()),
        None => batch.num_tokens(),
    };
    let dtype = match args.get(4).map(String::as_str) {
        None | Some("bf16") => DType::BF16,
        Some("f32") => DType::F32,
        Some(d) => bail!("dtype {d}: expected bf16 or f32"),
    };
    let logits: Tensor = logits.narrow(0, 0, rows)?.to_dtype(dtype)?;
    eprintln!("{}: {rows} rows of {} logits in {dtype:?}", args[2], logits.dim(1)?);
    candle_core::safetensors::save(&HashMap::from([("logits", logits)]), &args[2])?;
    Ok(())
}
