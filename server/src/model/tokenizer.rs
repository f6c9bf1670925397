//! The teacher's tokenizer (for `logitd sample --text`), and the digest reported
//! in ModelInfo so a trainer can refuse a teacher whose tokenizer differs from
//! its own.
//!
//! Tokenizer: `tokenizer.json` of a Hugging Face directory (or one given
//! explicitly); for a GGUF file with a GPT-2 style BPE tokenizer
//! (`tokenizer.ggml.model = gpt2`, e.g. SmolLM2, Llama 3, Qwen) it is rebuilt from
//! the GGUF's tokens and merges. Other GGUF tokenizers need an explicit file.
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

/// The tokenizer of the model at `model`, or the one in `explicit`.
pub fn load_tokenizer(
    model: &Path,
    explicit: Option<&Path>,
) -> Result<tokenizers::Tokenizer, ModelError> {
    let from_file = |f: &Path| {
        tokenizers::Tokenizer::from_file(f)
            .map_err(|e| ModelError::Config(format!("tokenizer {}: {e}", f.display())))
    };
    if let Some(f) = explicit {
        return from_file(f);
    }
    if model.is_dir() {
        let f = model.join("tokenizer.json");
        if !f.exists() {
            return Err(ModelError::MissingFile(f));
        }
        return from_file(&f);
    }
    let mut reader = BufReader::new(File::open(model).map_err(|e| ModelError::io(model, e))?);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::Gguf(format!("{}: {e}", model.display())))?;
    gguf_bpe_tokenizer(&content)
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>, ModelError> {
    let v = content
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::Gguf(format!("metadata `{key}` is missing")))?;
    let items = v.to_vec().map_err(|e| ModelError::Gguf(format!("metadata `{key}`: {e}")))?;
    items
        .iter()
        .map(|i| {
            i.to_string().cloned().map_err(|e| ModelError::Gguf(format!("metadata `{key}`: {e}")))
        })
        .collect()
}

/// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.{tokens,merges,token_type}`.
fn gguf_bpe_tokenizer(content: &Content) -> Result<tokenizers::Tokenizer, ModelError> {
    use tokenizers::{
        AddedToken, decoders::byte_level::ByteLevel as ByteLevelDecoder, models::bpe::BPE,
        pre_tokenizers::byte_level::ByteLevel,
    };
    let kind = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if kind != "gpt2" {
        return Err(ModelError::Config(format!(
            "this GGUF's tokenizer (tokenizer.ggml.model = {kind:?}) cannot be rebuilt here; pass --tokenizer tokenizer.json"
        )));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Gguf(format!("BPE from tokenizer metadata: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3, e.g. <|im_start|>) are matched whole, never split.
    if let Some(types) =
        content.metadata.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok())
    {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().is_ok_and(|t| t == 3))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
    }
    Ok(tokenizer)
}
