//! vLLM's OpenAI server: `GET /v1/models` and `POST /v1/completions` with
//! `prompt_logprobs`, as vLLM 0.34 answers them
//! (`vllm/entrypoints/openai/completion/{protocol,serving}.py`,
//! `vllm/logprobs.py`, `vllm/v1/engine/logprobs.py`).
//!
//! `choices[i].prompt_logprobs` has one entry per prompt token: entry 0 is
//! `null`, entry j maps `"<id>"` to `{"logprob", "rank", "decoded_token"}`
//! for token j itself first, then the top K (see [`score::vllm_entries`]).
//! `max_tokens` 1 (or absent) returns one token drawn from the last
//! position; 0 is allowed with `echo`, as in vLLM; more is refused, since
//! logitd scores and does not generate.

use axum::{body::Bytes, response::Response};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::{
    Ctx, HttpError,
    json::{self, Writer},
    json_response,
    score::{self, Scored, ToScore},
};

fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `GET /v1/models`: the served teacher, as vLLM's `ModelList`.
pub async fn models(ctx: Ctx, _body: Bytes) -> Result<Response, HttpError> {
    let info = ctx.service.info();
    let mut w = Writer::default();
    w.raw(r#"{"object":"list","data":[{"id":"#).str(&info.model_id);
    w.raw(r#","object":"model","created":"#).int(unix_time());
    w.raw(r#","owned_by":"logitd","root":"#).str(&info.model_id);
    w.raw(r#","parent":null,"max_model_len":"#).int(info.max_sequence_length);
    w.raw(r#","permission":[]}]}"#);
    Ok(json_response(w.finish()))
}

/// Decodes one id, as vLLM's `decoded_token` (`tokenizer.decode([id])`).
pub fn decode(tokenizer: Option<&Tokenizer>, ids: &[u32]) -> Option<String> {
    tokenizer.and_then(|t| t.decode(ids, false).ok())
}

/// Tokenizes a text prompt with the teacher's tokenizer (no special tokens
/// added), or says to send token ids.
pub fn tokenize(
    tokenizer: Option<&Tokenizer>,
    text: &str,
    field: &str,
) -> Result<Vec<u32>, HttpError> {
    let Some(t) = tokenizer else {
        return Err(HttpError::bad_request(
            format!(
                "`{field}` is text, and this logitd server has no tokenizer for its teacher; send token ids"
            ),
            Some(field),
        ));
    };
    t.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| HttpError::bad_request(format!("tokenizing `{field}`: {e}"), Some(field)))
}

/// vLLM's `prompt`: one token-id list, a list of them, one text or a list
/// of texts.
fn prompts(o: &json::Object, tokenizer: Option<&Tokenizer>) -> Result<Vec<Vec<u32>>, HttpError> {
    let empty = || {
        HttpError::bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.",
            Some("prompt"),
        )
    };
    match json::get(o, "prompt") {
        None => Err(empty()),
        Some(Value::String(s)) if s.is_empty() => Err(empty()),
        Some(Value::String(s)) => Ok(vec![tokenize(tokenizer, s, "prompt")?]),
        Some(v @ Value::Array(items)) => {
            if items.is_empty() {
                Err(empty())
            } else if items.iter().all(Value::is_string) {
                items
                    .iter()
                    .map(|s| tokenize(tokenizer, s.as_str().unwrap_or(""), "prompt"))
                    .collect()
            } else if items.iter().any(Value::is_array) {
                json::id_lists(v, "prompt")
            } else {
                // One list of ids; a non-id in it is named by its index.
                Ok(vec![json::ids(v, "prompt")?])
            }
        }
        Some(other) => Err(HttpError::schema(
            "list_type",
            format!(
                "`prompt` must be token ids, a list of token-id lists, a string or a list of strings, not {}",
                json::kind(other)
            ),
            Some("prompt"),
        )),
    }
}

/// What a completion request asks for, checked.
struct Asked {
    prompts: Vec<Vec<u32>>,
    echo: bool,
    /// Generated tokens: 0 or 1.
    max_tokens: usize,
    /// Softmax temperature of the scores (vLLM's 0, greedy, scores at 1).
    temperature: f32,
    greedy: bool,
    seed: Option<u64>,
    prompt_logprobs: Option<usize>,
    logprobs: Option<usize>,
    return_token_ids: bool,
}

fn parse(o: &json::Object, ctx: &Ctx) -> Result<Asked, HttpError> {
    let info = ctx.service.info();
    if let Some(model) = json::opt_str(o, "model")?
        && model != info.model_id
    {
        return Err(HttpError {
            status: axum::http::StatusCode::NOT_FOUND,
            error_type: "validation",
            ..HttpError::bad_request(format!("The model `{model}` does not exist."), Some("model"))
        });
    }
    if json::opt_bool(o, "stream")? == Some(true) {
        return Err(HttpError::bad_request(
            "`stream` is not supported: logitd answers a completion request whole",
            Some("stream"),
        ));
    }
    let n = json::opt_int(o, "n")?.unwrap_or(1);
    if n != 1 {
        return Err(HttpError::bad_request(
            format!("n = {n}: logitd scores each prompt once and does not generate; send n = 1"),
            Some("n"),
        ));
    }
    let echo = json::opt_bool(o, "echo")?.unwrap_or(false);
    let max_tokens = match json::opt_int(o, "max_tokens")? {
        // vLLM's default is 16 generated tokens; logitd generates at most one.
        None | Some(1) => 1,
        Some(0) if echo => 0,
        Some(m) if m < 1 => {
            return Err(HttpError::bad_request(
                format!("max_tokens must be at least 1, got {m}."),
                Some("max_tokens"),
            ));
        }
        Some(m) => {
            return Err(HttpError::bad_request(
                format!(
                    "max_tokens = {m}: logitd scores sequences and does not generate; it returns at most one token \
                     (max_tokens 1, or 0 with echo) and the prompt's logprobs (prompt_logprobs)"
                ),
                Some("max_tokens"),
            ));
        }
    };
    let t = json::opt_float(o, "temperature")?.unwrap_or(1.0);
    if !(t.is_finite() && t >= 0.0) {
        return Err(HttpError::bad_request(
            format!("temperature must be non-negative, got {t}."),
            Some("temperature"),
        ));
    }
    let greedy = t < 1e-5;
    let temperature = if greedy { 1.0 } else { t as f32 };
    let seed = json::opt_int(o, "seed")?.map(|s| s as u64);
    let vocab = info.vocab_size as i64;
    let count = |name: &str| -> Result<Option<usize>, HttpError> {
        let Some(v) = json::get(o, name) else { return Ok(None) };
        if !(v.is_number() || v.is_boolean()) {
            return Err(HttpError::bad_request(
                format!("`{name}` must be an integer."),
                Some(name),
            ));
        }
        let k = json::int(v, name)?;
        let k = match k {
            -1 => vocab,
            k if k < 0 => {
                return Err(HttpError::bad_request(
                    format!("`{name}` must be a positive value or -1."),
                    Some(name),
                ));
            }
            k => k,
        };
        let max = info.max_num_samples as i64;
        if k > max {
            let what =
                if name == "prompt_logprobs" { "prompt logprobs" } else { "sample logprobs" };
            return Err(HttpError::bad_request(
                format!(
                    "Requested {what} of {k}, which is greater than max allowed: {max} (logitd's --max-num-samples)"
                ),
                Some(name),
            ));
        }
        Ok(Some(k as usize))
    };
    let logprobs = count("logprobs")?;
    // vLLM: with echo, `logprobs` also asks for the prompt's.
    let prompt_logprobs = count("prompt_logprobs")?.or(if echo { logprobs } else { None });
    let return_token_ids = json::opt_bool(o, "return_token_ids")?.unwrap_or(false);
    let prompts = prompts(o, ctx.tokenizer.as_deref())?;
    Ok(Asked {
        prompts,
        echo,
        max_tokens,
        temperature,
        greedy,
        seed,
        prompt_logprobs,
        logprobs,
        return_token_ids,
    })
}

/// `POST /v1/completions`.
pub async fn completions(ctx: Ctx, body: Bytes) -> Result<Response, HttpError> {
    let o = json::object(&body)?;
    let a = parse(&o, &ctx)?;
    let tokenizer = ctx.tokenizer.as_deref();
    // The prompt's scores are needed for prompt_logprobs and for echo with
    // logprobs; otherwise only the last position (the generated token).
    let whole = a.prompt_logprobs.is_some() || (a.echo && a.logprobs.is_some());
    let to_score: Vec<ToScore> = a
        .prompts
        .iter()
        .map(|p| ToScore {
            tokens: p.clone(),
            first_token: if whole { 0 } else { p.len() },
            candidates: Vec::new(),
        })
        .collect();
    let k = a.prompt_logprobs.unwrap_or(0).max(a.logprobs.unwrap_or(0)).max(1) as u32;
    let reply =
        ctx.service.sample(score::request(&to_score, k, a.temperature, a.seed), None).await?;
    let info = ctx.service.info();

    let mut w = Writer::with_capacity(reply_size(&a));
    w.raw(r#"{"id":"#).str(&format!("cmpl-{:032x}", rand::random::<u128>()));
    w.raw(r#","object":"text_completion","created":"#).int(unix_time());
    w.raw(r#","model":"#).str(&info.model_id).raw(r#","choices":["#);
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, (seq, prompt)) in reply.sequences.iter().zip(&a.prompts).enumerate() {
        let scored = Scored::new(seq, prompt);
        let next = scored.next();
        let generated = if a.max_tokens == 1 {
            score::draw(&next, reply.seed, i, a.greedy)
                .map(|j| (next.top_ids[j], next.top_logprobs[j]))
        } else {
            None
        };
        prompt_tokens += prompt.len();
        completion_tokens += generated.is_some() as usize;
        if i > 0 {
            w.raw(",");
        }
        w.raw(r#"{"index":"#).int(i).raw(r#","text":"#);
        let generated_text = generated.map(|(id, _)| decode(tokenizer, &[id]).unwrap_or_default());
        let mut text =
            if a.echo { decode(tokenizer, prompt).unwrap_or_default() } else { String::new() };
        text.push_str(generated_text.as_deref().unwrap_or(""));
        w.str(&text).raw(r#","logprobs":"#);
        match a.logprobs {
            Some(n) => completion_logprobs(&mut w, &scored, a.echo, generated, n, tokenizer),
            None => {
                w.raw("null");
            }
        }
        w.raw(r#","finish_reason":"length","stop_reason":null,"token_ids":"#);
        match (a.return_token_ids, generated) {
            (true, Some((id, _))) => w.raw("[").int(id).raw("]"),
            (true, None) => w.raw("[]"),
            (false, _) => w.raw("null"),
        };
        w.raw(r#","prompt_logprobs":"#);
        match a.prompt_logprobs {
            Some(k) => prompt_logprobs(&mut w, &scored, k, tokenizer),
            None => {
                w.raw("null");
            }
        }
        w.raw(r#","prompt_token_ids":"#);
        if a.return_token_ids {
            ids(&mut w, prompt);
        } else {
            w.raw("null");
        }
        w.raw(r#","routed_experts":null,"weight_versions":null}"#);
    }
    w.raw(r#"],"service_tier":null,"system_fingerprint":null,"usage":{"prompt_tokens":"#)
        .int(prompt_tokens);
    w.raw(r#","total_tokens":"#).int(prompt_tokens + completion_tokens);
    w.raw(r#","completion_tokens":"#).int(completion_tokens);
    w.raw(r#","completion_tokens_details":null},"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}"#);
    Ok(json_response(w.finish()))
}

fn reply_size(a: &Asked) -> usize {
    let tokens: usize = a.prompts.iter().map(Vec::len).sum();
    512 + tokens * (a.prompt_logprobs.unwrap_or(0) + 1) * 64
}

fn ids(w: &mut Writer, ids: &[u32]) {
    w.raw("[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        w.int(id);
    }
    w.raw("]");
}

/// `prompt_logprobs`: `null` for token 0 (and any token not scored), then
/// vLLM's dict per token, the token itself first.
fn prompt_logprobs(w: &mut Writer, scored: &Scored<'_>, k: usize, tokenizer: Option<&Tokenizer>) {
    w.raw("[");
    for j in 0..scored.tokens().len() {
        if j > 0 {
            w.raw(",");
        }
        let Some(t) = scored.token(j) else {
            w.raw("null");
            continue;
        };
        w.raw("{");
        for (e, (id, logprob, rank)) in score::vllm_entries(&t, k).into_iter().enumerate() {
            if e > 0 {
                w.raw(",");
            }
            w.raw("\"").int(id).raw(r#"":{"logprob":"#).logprob(logprob);
            w.raw(r#","rank":"#).int(rank).raw(r#","decoded_token":"#);
            w.opt_str(decode(tokenizer, &[id]).as_deref()).raw("}");
        }
        w.raw("}");
    }
    w.raw("]");
}

/// (id, log-probability) pairs of one listed token: itself, then its top.
type Entries = Vec<(u32, f32)>;

/// The OpenAI `logprobs` object (`CompletionLogProbs`): with echo the
/// prompt's tokens first (the first one `null`), then the generated token;
/// `top_logprobs` maps the decoded token (`token_id:<id>` when the server has
/// no tokenizer, vLLM's `return_tokens_as_token_ids` form) to its
/// log-probability, the token itself first, then the top `n`.
fn completion_logprobs(
    w: &mut Writer,
    scored: &Scored<'_>,
    echo: bool,
    generated: Option<(u32, f32)>,
    n: usize,
    tokenizer: Option<&Tokenizer>,
) {
    let name = |id: u32| match tokenizer {
        Some(_) => decode(tokenizer, &[id]).unwrap_or_default(),
        None => format!("token_id:{id}"),
    };
    // (token, its logprob and the top n with theirs), per listed token.
    let mut steps: Vec<(u32, Option<Entries>)> = Vec::new();
    if echo {
        for j in 0..scored.tokens().len() {
            let step = scored.token(j).map(|t| {
                score::vllm_entries(&t, n)
                    .into_iter()
                    .map(|(id, lp, _)| (id, lp))
                    .collect::<Vec<_>>()
            });
            steps.push((scored.tokens()[j], step));
        }
    }
    if let Some((id, lp)) = generated {
        let next = scored.next();
        let mut top = vec![(id, lp)];
        let k = n.min(next.top_ids.len());
        top.extend(
            next.top_ids[..k]
                .iter()
                .copied()
                .zip(next.top_logprobs[..k].iter().copied())
                .filter(|e| e.0 != id),
        );
        steps.push((id, Some(top)));
    }
    let (mut offsets, mut tokens) = (Vec::new(), Vec::new());
    let mut offset = 0usize;
    for (id, _) in &steps {
        let token = name(*id);
        offsets.push(offset);
        offset += token.chars().count();
        tokens.push(token);
    }
    w.raw(r#"{"text_offset":["#);
    for (i, o) in offsets.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        w.int(o);
    }
    w.raw(r#"],"token_logprobs":["#);
    for (i, (_, step)) in steps.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        match step {
            Some(entries) => w.logprob(entries[0].1.max(-9999.0)),
            None => w.raw("null"),
        };
    }
    w.raw(r#"],"tokens":["#);
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        w.str(t);
    }
    w.raw(r#"],"top_logprobs":["#);
    for (i, (_, step)) in steps.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        let Some(entries) = step else {
            w.raw("null");
            continue;
        };
        // A JSON object: a later equal decoded token replaces an earlier one,
        // as in vLLM's dict.
        let mut seen: Vec<(String, f32)> = Vec::new();
        for &(id, lp) in entries {
            let key = name(id);
            match seen.iter_mut().find(|(k, _)| *k == key) {
                Some(e) => e.1 = lp,
                None => seen.push((key, lp)),
            }
        }
        w.raw("{");
        for (e, (key, lp)) in seen.iter().enumerate() {
            if e > 0 {
                w.raw(",");
            }
            w.str(key).raw(":").logprob(lp.max(-9999.0));
        }
        w.raw("}");
    }
    w.raw("]}");
}
