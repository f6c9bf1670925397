//! The teacher's tokenizer (for `logitd sample --text`), and the digest reported
//! in ModelInfo so a trainer can refuse a teacher whose tokenizer differs from
//! its own.
//!
//! Tokenizer: `tokenizer.json` of a Hugging Face directory (or one given
//! explicitly); for a GGUF file with a GPT-2 style BPE tokenizer
//! (`tokenizer.ggml.model = gpt2`) it is rebuilt from the GGUF's tokens and
//! merges, with the pre-tokenizer `tokenizer.ggml.pre` names: GPT-2's split for
//! `gpt2`, `smollm` (SmolLM2) or none; Llama 3's split for `llama-bpe`; Qwen 2/3's
//! split and NFC for `qwen2` (each as in that family's released tokenizer.json);
//! control tokens (type 3) become special added tokens and user-defined ones
//! (type 4, e.g. `<think>`) plain added tokens. Other GGUF tokenizers need an
//! explicit file.
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

/// Llama 3's pre-tokenizer split (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2/2.5/3's pre-tokenizer split (`tokenizer.ggml.pre = qwen2`): digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.{tokens,merges,token_type}`.
fn gguf_bpe_tokenizer(content: &Content) -> Result<tokenizers::Tokenizer, ModelError> {
    use tokenizers::{
        AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior,
        decoders::byte_level::ByteLevel as ByteLevelDecoder,
        models::bpe::BPE,
        normalizers::unicode::NFC,
        pre_tokenizers::{
            byte_level::ByteLevel,
            sequence::Sequence,
            split::{Split, SplitPattern},
        },
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
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    // The split each family's own tokenizer.json applies before the byte-level
    // mapping (the regexes are copied from Llama 3.2's and Qwen 2.5's files).
    let split = |regex: &str| -> Result<PreTokenizerWrapper, ModelError> {
        let split =
            Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| ModelError::Gguf(format!("pre-tokenizer `{pre}`: {e}")))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    match pre.as_str() {
        "" | "default" | "gpt2" | "smollm" => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        "llama-bpe" | "llama3" | "llama-v3" => {
            tokenizer.with_pre_tokenizer(Some(split(LLAMA3_SPLIT)?));
        }
        "qwen2" => {
            tokenizer.with_normalizer(Some(NFC));
            tokenizer.with_pre_tokenizer(Some(split(QWEN2_SPLIT)?));
        }
        other => {
            return Err(ModelError::Config(format!(
                "this GGUF's pre-tokenizer (tokenizer.ggml.pre = {other:?}) is not one logitd rebuilds \
                 (gpt2, smollm, llama-bpe, qwen2); pass --tokenizer tokenizer.json"
            )));
        }
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3, e.g. <|im_start|>) are matched whole, never split;
    // so are user-defined ones (type 4, e.g. Qwen's <think>), as plain added tokens.
    if let Some(types) =
        content.metadata.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok())
    {
        let of_type = |want: i32| {
            types
                .iter()
                .zip(&tokens)
                .filter(move |(t, _)| t.to_i32().is_ok_and(|t| t == want))
                .map(|(_, tok)| tok.clone())
        };
        let special: Vec<AddedToken> = of_type(3).map(|t| AddedToken::from(t, true)).collect();
        tokenizer.add_special_tokens(&special);
        let user: Vec<AddedToken> =
            of_type(4).map(|t| AddedToken::from(t, false).normalized(false)).collect();
        tokenizer.add_tokens(&user);
    }
    Ok(tokenizer)
}
