//! The tokenizer digest reported in ModelInfo, so a trainer can refuse a
//! teacher whose tokenizer differs from its own.
//!
//! - Hugging Face directory: SHA-256 of `tokenizer.json`'s bytes.
//! - GGUF: SHA-256 of the `tokenizer.*` metadata in a canonical text form: keys
//!   sorted, one `key=value` line each, arrays as their elements joined by
//!   U+001F, strings as they are, numbers in Rust's `Display` form.

use std::{fs::File, io::BufReader, path::Path};

use candle_core::quantized::gguf_file::{Content, Value};
use sha2::{Digest, Sha256};

use super::ModelError;

fn canonical(v: &Value, out: &mut String) {
    use std::fmt::Write;
    match v {
        Value::U8(x) => write!(out, "{x}"),
        Value::I8(x) => write!(out, "{x}"),
        Value::U16(x) => write!(out, "{x}"),
        Value::I16(x) => write!(out, "{x}"),
        Value::U32(x) => write!(out, "{x}"),
        Value::I32(x) => write!(out, "{x}"),
        Value::U64(x) => write!(out, "{x}"),
        Value::I64(x) => write!(out, "{x}"),
        Value::F32(x) => write!(out, "{x}"),
        Value::F64(x) => write!(out, "{x}"),
        Value::Bool(x) => write!(out, "{x}"),
        Value::String(x) => write!(out, "{x}"),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push('\u{1f}');
                }
                canonical(item, out);
            }
            Ok(())
        }
    }
    .expect("writing to a String cannot fail");
}

/// The tokenizer digest of the model at `path`, or `None` if it carries no
/// tokenizer.
pub fn tokenizer_sha256(path: &Path) -> Result<Option<String>, ModelError> {
    if path.is_dir() {
        let file = path.join("tokenizer.json");
        if !file.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&file).map_err(|e| ModelError::io(&file, e))?;
        return Ok(Some(hex(&Sha256::digest(&bytes))));
    }
    let mut reader = BufReader::new(File::open(path).map_err(|e| ModelError::io(path, e))?);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::Gguf(format!("{}: {e}", path.display())))?;
    let mut keys: Vec<&String> =
        content.metadata.keys().filter(|k| k.starts_with("tokenizer.")).collect();
    if keys.is_empty() {
        return Ok(None);
    }
    keys.sort();
    let mut text = String::new();
    for k in keys {
        text.push_str(k);
        text.push('=');
        canonical(&content.metadata[k], &mut text);
        text.push('\n');
    }
    Ok(Some(hex(&Sha256::digest(text.as_bytes()))))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
