//! TRL's `POST /get_sequence_logprobs/`, served by `trl vllm-serve` in TRL
//! 1.1 (`trl/scripts/vllm_serve.py`, `_format_logprob_response`) and read
//! by its `VLLMClient.get_sequence_logprobs` (`trl/generation/vllm_client.py`).
//!
//! Body: `sequences`, `prompt_lengths`, `top_logprobs` (100), `temperature`
//! (1.0), `response_format` (`json` or `binary`). For each sequence the rows
//! are its completion tokens, `prompt_length..len`, each vLLM's dict sorted
//! by rank:
//! - `json`: `logprobs` and `logprob_token_ids`, every entry of the dict (the
//!   top k, and the realised token when it is not among them); a row with
//!   no scores (token 0) is `[]`. The other fields are `null`, as FastAPI
//!   writes the response model.
//! - `binary`: base64 of little-endian numpy arrays: `logprobs_b64` (f32,
//!   `[batch, max_completion_len, top_k]`, padded with -inf), `token_ids_b64`
//!   (i32, padded with 0), `actual_logprobs_b64` and `actual_token_ids_b64`
//!   (`[batch, max_completion_len, 1]`, the realised token), `shape` and
//!   `completion_lengths`: the six keys the server writes with orjson.

use axum::{body::Bytes, response::Response};
use base64::Engine as _;

use super::{
    Ctx, HttpError,
    json::{self, Writer},
    json_response,
    score::{self, Scored, ToScore},
};

/// A `/get_sequence_logprobs/` request, checked.
struct Parsed {
    /// Each sequence, scored from its prompt length on.
    to_score: Vec<ToScore>,
    /// Entries per position (`top_logprobs`, default 100).
    top_k: usize,
    temperature: f64,
    /// `response_format: "binary"` (base64 numpy arrays) rather than JSON.
    binary: bool,
}

/// Reads and checks the request's fields; `max` is `--max-num-samples`.
fn parse(o: &json::Object, max: i64) -> Result<Parsed, HttpError> {
    let missing =
        |name: &str| HttpError::schema("missing", format!("`{name}` is required"), Some(name));
    let sequences = json::id_lists(
        json::get(o, "sequences").ok_or_else(|| missing("sequences"))?,
        "sequences",
    )?;
    let prompt_lengths: Vec<i64> = match json::get(o, "prompt_lengths")
        .ok_or_else(|| missing("prompt_lengths"))?
    {
        serde_json::Value::Array(items) => {
            items.iter().map(|v| json::int(v, "prompt_lengths")).collect::<Result<_, _>>()?
        }
        other => {
            return Err(HttpError::schema(
                "list_type",
                format!("`prompt_lengths` must be a list of integers, not {}", json::kind(other)),
                Some("prompt_lengths"),
            ));
        }
    };
    let top_k = json::opt_int(o, "top_logprobs")?.unwrap_or(100);
    let temperature = json::opt_float(o, "temperature")?.unwrap_or(1.0);
    let binary = match json::opt_str(o, "response_format")?.unwrap_or("json") {
        "json" => false,
        "binary" => true,
        other => {
            return Err(HttpError::bad_request(
                format!("response_format {other:?} must be \"json\" or \"binary\""),
                Some("response_format"),
            ));
        }
    };
    if sequences.len() != prompt_lengths.len() {
        return Err(HttpError::bad_request(
            format!(
                "sequences and prompt_lengths must have the same length ({} and {}).",
                sequences.len(),
                prompt_lengths.len()
            ),
            None,
        ));
    }
    let mut to_score = Vec::with_capacity(sequences.len());
    for (i, (seq, &pl)) in sequences.into_iter().zip(&prompt_lengths).enumerate() {
        if pl < 0 || pl as usize > seq.len() {
            return Err(HttpError::bad_request(
                format!(
                    "Sequence {i} has prompt_length={pl} which is out of range [0, {}]. prompt_length must be between 0 and the sequence length inclusive.",
                    seq.len()
                ),
                Some("prompt_lengths"),
            ));
        }
        to_score.push(ToScore { tokens: seq, first_token: pl as usize, candidates: Vec::new() });
    }
    if !(0..=max).contains(&top_k) {
        return Err(HttpError::bad_request(
            format!(
                "top_logprobs = {top_k} must be between 0 and {max} (logitd's --max-num-samples)"
            ),
            Some("top_logprobs"),
        ));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(HttpError::bad_request(
            format!("temperature must be positive, got {temperature}"),
            Some("temperature"),
        ));
    }
    Ok(Parsed { to_score, top_k: top_k as usize, temperature, binary })
}

/// `POST /get_sequence_logprobs/`.
pub async fn get_sequence_logprobs(ctx: Ctx, body: Bytes) -> Result<Response, HttpError> {
    let o = json::object(&body)?;
    let max = ctx.service.info().max_num_samples as i64;
    let Parsed { to_score, top_k, temperature, binary } = parse(&o, max)?;
    let k = top_k.max(1) as u32;
    let reply =
        ctx.service.sample(score::request(&to_score, k, temperature as f32, None), None).await?;
    // Each completion row: vLLM's dict sorted by rank (None for token 0).
    let rows = |seq, s: &ToScore| {
        let scored = Scored::new(seq, &s.tokens);
        (s.first_token..s.tokens.len())
            .map(|j| {
                scored
                    .token(j)
                    .map(|t| (t.token, t.logprob, score::by_rank(score::vllm_entries(&t, top_k))))
            })
            .collect::<Vec<_>>()
    };
    let out = if binary {
        let all: Vec<_> = reply.sequences.iter().zip(&to_score).map(|(q, s)| rows(q, s)).collect();
        let batch = all.len();
        let max_len = all.iter().map(Vec::len).max().unwrap_or(0);
        let mut logprobs = vec![f32::NEG_INFINITY; batch * max_len * top_k];
        let mut token_ids = vec![0i32; batch * max_len * top_k];
        let mut actual_logprobs = vec![f32::NEG_INFINITY; batch * max_len];
        let mut actual_ids = vec![0i32; batch * max_len];
        for (b, seq_rows) in all.iter().enumerate() {
            for (t, row) in seq_rows.iter().enumerate() {
                let Some((token, logprob, entries)) = row else { continue };
                actual_logprobs[b * max_len + t] = *logprob;
                actual_ids[b * max_len + t] = *token as i32;
                for (e, &(id, lp, _)) in entries.iter().take(top_k).enumerate() {
                    let at = (b * max_len + t) * top_k + e;
                    logprobs[at] = lp;
                    token_ids[at] = id as i32;
                }
            }
        }
        let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
        let f32s = |v: &[f32]| b64(v.iter().flat_map(|x| x.to_le_bytes()).collect());
        let i32s = |v: &[i32]| b64(v.iter().flat_map(|x| x.to_le_bytes()).collect());
        let mut w = Writer::with_capacity(256 + logprobs.len() * 11);
        w.raw(r#"{"logprobs_b64":"#).str(&f32s(&logprobs));
        w.raw(r#","token_ids_b64":"#).str(&i32s(&token_ids));
        w.raw(r#","actual_logprobs_b64":"#).str(&f32s(&actual_logprobs));
        w.raw(r#","actual_token_ids_b64":"#).str(&i32s(&actual_ids));
        w.raw(r#","shape":["#).int(batch).raw(",").int(max_len).raw(",").int(top_k);
        w.raw(r#"],"completion_lengths":["#);
        for (i, r) in all.iter().enumerate() {
            if i > 0 {
                w.raw(",");
            }
            w.int(r.len());
        }
        w.raw("]}");
        w
    } else {
        let mut w = Writer::default();
        let mut ids_part = Writer::default();
        w.raw(r#"{"logprobs":["#);
        ids_part.raw(r#","logprob_token_ids":["#);
        for (i, (q, s)) in reply.sequences.iter().zip(&to_score).enumerate() {
            if i > 0 {
                w.raw(",");
                ids_part.raw(",");
            }
            w.raw("[");
            ids_part.raw("[");
            for (t, row) in rows(q, s).into_iter().enumerate() {
                if t > 0 {
                    w.raw(",");
                    ids_part.raw(",");
                }
                w.raw("[");
                ids_part.raw("[");
                for (e, (id, lp, _)) in row.map(|r| r.2).unwrap_or_default().into_iter().enumerate()
                {
                    if e > 0 {
                        w.raw(",");
                        ids_part.raw(",");
                    }
                    w.logprob(lp);
                    ids_part.int(id);
                }
                w.raw("]");
                ids_part.raw("]");
            }
            w.raw("]");
            ids_part.raw("]");
        }
        w.raw("]").raw(&ids_part.0);
        w.raw(
            r#"],"logprobs_b64":null,"token_ids_b64":null,"actual_logprobs_b64":null,"actual_token_ids_b64":null,"shape":null,"completion_lengths":null}"#,
        );
        w
    };
    Ok(json_response(out.finish()))
}
