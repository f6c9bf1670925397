//! Token corpora as JSON lines, the input of `logitd-client dump` and
//! `logitd-bench`: one sequence per line, either an array of token ids or an
//! object `{"token_ids": [...], "first_position": N}` (`first_position`
//! optional, default 0). Blank lines are skipped.

use std::{io::BufRead, path::Path};

use anyhow::{Context, bail};

/// Reads a corpus: per line, the token ids and the first position to return.
/// Errors name the file and line.
pub fn read_corpus(path: &Path) -> anyhow::Result<Vec<(Vec<u32>, u32)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let (ids, first) = match &v {
            serde_json::Value::Array(_) => (&v, 0),
            serde_json::Value::Object(o) => (
                o.get("token_ids")
                    .with_context(|| format!("{}:{}: no token_ids", path.display(), n + 1))?,
                o.get("first_position").and_then(|f| f.as_u64()).unwrap_or(0) as u32,
            ),
            _ => bail!("{}:{}: expected an array or an object", path.display(), n + 1),
        };
        let ids: Vec<u32> = serde_json::from_value(ids.clone()).with_context(|| {
            format!("{}:{}: token_ids must be non-negative integers", path.display(), n + 1)
        })?;
        out.push((ids, first));
    }
    Ok(out)
}
