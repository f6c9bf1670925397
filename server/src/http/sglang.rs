//! SGLang's `POST /generate` for scoring (`max_new_tokens: 0`,
//! `return_logprob`), as SGLang 0.5.23 answers it
//! (`sglang/srt/managers/io_struct.py`, `tokenizer_manager.py`,
//! `scheduler_components/logprob_result_processor.py`).
//!
//! `meta_info.input_token_logprobs` has one `[logprob, id, text]` triple per
//! token from `logprob_start_len` on, the first with a `null` logprob (SGLang
//! prepends `None` whatever the start); `input_top_logprobs` and
//! `input_token_ids_logprobs` are `null` there and lists of triples after.
//! `text` is the decoded token with `return_text_in_logprobs` and a
//! tokenizer, else `null`.

use axum::{body::Bytes, response::Response};
use serde_json::Value;

use super::{
    Ctx, HttpError,
    json::{self, Writer},
    json_response,
    score::{self, Scored, ToScore},
    vllm::{decode, tokenize},
};

/// One item of a (possibly batched) request.
struct Item {
    tokens: Vec<u32>,
    return_logprob: bool,
    start: usize,
    top: usize,
    token_ids: Vec<u32>,
    token_ids_asked: bool,
    max_new_tokens: usize,
    temperature: f32,
    greedy: bool,
}

/// Field `name` for item `i` of `n`: a scalar shared by all, or a list
/// with one per item.
fn per_item<'a>(
    o: &'a json::Object,
    name: &str,
    i: usize,
    n: usize,
    batched: bool,
) -> Result<Option<&'a Value>, HttpError> {
    match json::get(o, name) {
        Some(Value::Array(items)) if batched && name != "token_ids_logprob" => match items.get(i) {
            Some(v) if items.len() == n => Ok(Some(v).filter(|v| !v.is_null())),
            _ => Err(HttpError::bad_request(
                format!("`{name}` has {} entries for a batch of {n}", items.len()),
                Some(name),
            )),
        },
        v => Ok(v),
    }
}

fn items(o: &json::Object, ctx: &Ctx) -> Result<(Vec<Item>, bool), HttpError> {
    if json::opt_bool(o, "stream")? == Some(true) {
        return Err(HttpError::bad_request(
            "`stream` is not supported: logitd answers /generate whole",
            Some("stream"),
        ));
    }
    let (inputs, batched) = inputs(o, ctx.tokenizer.as_deref())?;
    if batched && inputs.is_empty() {
        return Err(HttpError::bad_request("`input_ids` is an empty batch", Some("input_ids")));
    }
    let n = inputs.len();
    let mut out = Vec::with_capacity(n);
    for (i, tokens) in inputs.into_iter().enumerate() {
        out.push(item(o, ctx, tokens, (i, n, batched))?);
    }
    Ok((out, batched))
}

/// The request's token sequences, from `input_ids` or tokenized `text`, and
/// whether they came as a batch.
fn inputs(
    o: &json::Object,
    tokenizer: Option<&tokenizers::Tokenizer>,
) -> Result<(Vec<Vec<u32>>, bool), HttpError> {
    Ok(match (json::get(o, "input_ids"), json::get(o, "text")) {
        (Some(v), _) if json::is_id_list(v) => (vec![json::ids(v, "input_ids")?], false),
        (Some(v), _) => (json::id_lists(v, "input_ids")?, true),
        (None, Some(Value::String(s))) => (vec![tokenize(tokenizer, s, "text")?], false),
        (None, Some(Value::Array(texts))) => {
            let texts = texts
                .iter()
                .map(|t| match t {
                    Value::String(s) => tokenize(tokenizer, s, "text"),
                    other => Err(HttpError::bad_request(
                        format!("`text` entries must be strings, not {}", json::kind(other)),
                        Some("text"),
                    )),
                })
                .collect::<Result<_, _>>()?;
            (texts, true)
        }
        (None, Some(other)) => {
            return Err(HttpError::bad_request(
                format!("`text` must be a string or a list of strings, not {}", json::kind(other)),
                Some("text"),
            ));
        }
        (None, None) => {
            return Err(HttpError::bad_request(
                "Either text or input_ids should be provided.",
                Some("input_ids"),
            ));
        }
    })
}

/// Item `i` of `n` (of a batch when `batched`): its scoring parameters.
fn item(
    o: &json::Object,
    ctx: &Ctx,
    tokens: Vec<u32>,
    (i, n, batched): (usize, usize, bool),
) -> Result<Item, HttpError> {
    let return_logprob = per_item(o, "return_logprob", i, n, batched)?
        .map(|v| json::boolean(v, "return_logprob"))
        .transpose()?
        .unwrap_or(false);
    let len = tokens.len();
    // SGLang: -1 (the default) is the last token only; past the end too.
    let start = match per_item(o, "logprob_start_len", i, n, batched)?
        .map(|v| json::int(v, "logprob_start_len"))
        .transpose()?
    {
        None | Some(-1) => len.saturating_sub(1),
        Some(s) if s < 0 => {
            return Err(HttpError::bad_request(
                format!("logprob_start_len = {s} must be -1 or at least 0"),
                Some("logprob_start_len"),
            ));
        }
        Some(s) => (s as usize).min(len.saturating_sub(1)),
    };
    let top = per_item(o, "top_logprobs_num", i, n, batched)?
        .map(|v| json::int(v, "top_logprobs_num"))
        .transpose()?
        .unwrap_or(0);
    let max = ctx.service.info().max_num_samples as i64;
    if !(0..=max).contains(&top) {
        return Err(HttpError::bad_request(
            format!(
                "top_logprobs_num = {top} must be between 0 and {max} (logitd's --max-num-samples)"
            ),
            Some("top_logprobs_num"),
        ));
    }
    let (token_ids, token_ids_asked) = match json::get(o, "token_ids_logprob") {
        None => (Vec::new(), false),
        Some(v) if json::is_id_list(v) => (json::ids(v, "token_ids_logprob")?, true),
        Some(Value::Array(lists)) if batched && lists.len() == n => match &lists[i] {
            Value::Null => (Vec::new(), false),
            v => (json::ids(v, "token_ids_logprob")?, true),
        },
        Some(v) => {
            return Err(HttpError::bad_request(
                format!(
                    "`token_ids_logprob` must be a list of token ids (or one per item), not {}",
                    json::kind(v)
                ),
                Some("token_ids_logprob"),
            ));
        }
    };
    let (max_new_tokens, temperature, greedy) =
        sampling(per_item(o, "sampling_params", i, n, batched)?)?;
    Ok(Item {
        tokens,
        return_logprob,
        start,
        top: top as usize,
        token_ids,
        token_ids_asked,
        max_new_tokens,
        temperature,
        greedy,
    })
}

/// `sampling_params`: max_new_tokens (0 or 1), temperature (1 when greedy)
/// and whether greedy (a temperature below 1e-6).
fn sampling(params: Option<&Value>) -> Result<(usize, f32, bool), HttpError> {
    let params = match params {
        None => json::Object::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(other) => {
            return Err(HttpError::bad_request(
                format!("`sampling_params` must be an object, not {}", json::kind(other)),
                Some("sampling_params"),
            ));
        }
    };
    // SGLang's default is 128 new tokens; logitd scores: absent is 0.
    let max_new_tokens = match json::opt_int(&params, "max_new_tokens")? {
        None | Some(0) => 0,
        Some(1) => 1,
        Some(m) => {
            return Err(HttpError::bad_request(
                format!(
                    "max_new_tokens = {m}: logitd scores sequences and does not generate; send max_new_tokens 0 (or 1)"
                ),
                Some("max_new_tokens"),
            ));
        }
    };
    if let Some(nn) = json::opt_int(&params, "n")?
        && nn != 1
    {
        return Err(HttpError::bad_request(
            format!("n = {nn}: logitd scores each input once; send n = 1"),
            Some("n"),
        ));
    }
    let t = json::opt_float(&params, "temperature")?.unwrap_or(1.0);
    if !(t.is_finite() && t >= 0.0) {
        return Err(HttpError::bad_request(
            format!("temperature must be non-negative, got {t}"),
            Some("temperature"),
        ));
    }
    let greedy = t < 1e-6;
    Ok((max_new_tokens, if greedy { 1.0 } else { t as f32 }, greedy))
}

/// `POST /generate`.
pub async fn generate(ctx: Ctx, body: Bytes) -> Result<Response, HttpError> {
    let o = json::object(&body)?;
    let (items, batched) = items(&o, &ctx)?;
    let seed = o
        .get("sampling_params")
        .and_then(|p| p.get("sampling_seed").or_else(|| p.get("seed")))
        .and_then(Value::as_u64);
    let text_in_logprobs = json::opt_bool(&o, "return_text_in_logprobs")?.unwrap_or(false);
    let tokenizer = ctx.tokenizer.as_deref();
    // Items sharing a temperature and k go in one request; usually all do.
    let mut replies = vec![None; items.len()];
    let mut groups: Vec<(f32, u32, Vec<usize>)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let k = it.top.max(1) as u32;
        match groups.iter_mut().find(|g| g.0 == it.temperature && g.1 == k) {
            Some(g) => g.2.push(i),
            None => groups.push((it.temperature, k, vec![i])),
        }
    }
    let started = std::time::Instant::now();
    for (t, k, members) in groups {
        let to_score: Vec<ToScore> = members
            .iter()
            .map(|&i| {
                let it = &items[i];
                let first_token = if it.return_logprob { it.start } else { it.tokens.len() };
                ToScore { tokens: it.tokens.clone(), first_token, candidates: it.token_ids.clone() }
            })
            .collect();
        let reply = ctx.service.sample(score::request(&to_score, k, t, seed), None).await?;
        let seed = reply.seed;
        for (seq, &i) in reply.sequences.into_iter().zip(&members) {
            replies[i] = Some((seq, seed));
        }
    }
    let latency = started.elapsed().as_secs_f64();
    let text = |id: u32| if text_in_logprobs { decode(tokenizer, &[id]) } else { None };
    let mut w = Writer::default();
    if batched {
        w.raw("[");
    }
    for (i, (it, reply)) in items.iter().zip(&replies).enumerate() {
        let (seq, seed) = reply.as_ref().expect("every item is answered");
        let scored = Scored::new(seq, &it.tokens);
        let next = scored.next();
        let generated = if it.max_new_tokens == 1 {
            score::draw(&next, *seed, i, it.greedy)
                .map(|j| (next.top_ids[j], next.top_logprobs[j], j))
        } else {
            None
        };
        if i > 0 {
            w.raw(",");
        }
        w.raw(r#"{"text":"#);
        w.str(&generated.and_then(|g| decode(tokenizer, &[g.0])).unwrap_or_default());
        w.raw(r#","output_ids":["#);
        if let Some(g) = generated {
            w.int(g.0);
        }
        w.raw(r#"],"meta_info":{"id":"#).str(&format!("{:032x}", rand::random::<u128>()));
        let new = generated.is_some() as usize;
        w.raw(r#","finish_reason":{"type":"length","length":"#).int(new);
        w.raw(r#"},"prompt_tokens":"#).int(it.tokens.len());
        w.raw(r#","weight_version":"default","completion_tokens":"#).int(new);
        w.raw(r#","cached_tokens":0,"e2e_latency":"#).raw(&format!("{latency:?}"));
        if it.return_logprob {
            write_logprobs(&mut w, it, &scored, &next, generated, &text);
        }
        w.raw("}}");
    }
    if batched {
        w.raw("]");
    }
    Ok(json_response(w.finish()))
}

/// An item's `input_*` and `output_*` logprob fields: the realised tokens'
/// from its start, the top entries and the asked ids where it asked for them,
/// and the generated token's (`generated`: id, logprob, entry).
fn write_logprobs(
    w: &mut Writer,
    it: &Item,
    scored: &Scored<'_>,
    next: &score::Row<'_>,
    generated: Option<(u32, f32, usize)>,
    text: &dyn Fn(u32) -> Option<String>,
) {
    let range = it.start..it.tokens.len();
    w.raw(r#","input_token_logprobs":["#);
    for (n, j) in range.clone().enumerate() {
        if n > 0 {
            w.raw(",");
        }
        // SGLang's first entry has no logprob, whatever the start.
        let t = if n == 0 { None } else { scored.token(j) };
        triple(w, t.map(|t| t.logprob), it.tokens[j], text(it.tokens[j]).as_deref());
    }
    w.raw(r#"],"output_token_logprobs":["#);
    if let Some((id, lp, _)) = generated {
        triple(w, Some(lp), id, text(id).as_deref());
    }
    w.raw("]");
    if it.top > 0 {
        w.raw(r#","input_top_logprobs":["#);
        for (n, j) in range.clone().enumerate() {
            if n > 0 {
                w.raw(",");
            }
            match scored.token(j).filter(|_| n > 0) {
                None => {
                    w.raw("null");
                }
                Some(t) => {
                    let k = it.top.min(t.top_ids.len());
                    triples(
                        w,
                        t.top_logprobs[..k].iter().copied().zip(t.top_ids[..k].iter().copied()),
                        &text,
                    );
                }
            }
        }
        w.raw(r#"],"output_top_logprobs":["#);
        if generated.is_some() {
            let k = it.top.min(next.top_ids.len());
            triples(
                w,
                next.top_logprobs[..k].iter().copied().zip(next.top_ids[..k].iter().copied()),
                &text,
            );
        }
        w.raw("]");
    }
    if it.token_ids_asked {
        w.raw(r#","input_token_ids_logprobs":["#);
        for (n, j) in range.clone().enumerate() {
            if n > 0 {
                w.raw(",");
            }
            match scored.token(j).filter(|_| n > 0 && !it.token_ids.is_empty()) {
                None => {
                    w.raw("null");
                }
                Some(t) => {
                    triples(
                        w,
                        t.candidate_logprobs.iter().copied().zip(it.token_ids.iter().copied()),
                        &text,
                    );
                }
            }
        }
        w.raw(r#"],"output_token_ids_logprobs":["#);
        if generated.is_some() && !it.token_ids.is_empty() {
            triples(
                w,
                next.candidate_logprobs.iter().copied().zip(it.token_ids.iter().copied()),
                &text,
            );
        }
        w.raw("]");
    }
}

fn triple(w: &mut Writer, logprob: Option<f32>, id: u32, text: Option<&str>) {
    w.raw("[");
    match logprob {
        Some(lp) => w.logprob(lp),
        None => w.raw("null"),
    };
    w.raw(",").int(id).raw(",").opt_str(text).raw("]");
}

fn triples(
    w: &mut Writer,
    entries: impl Iterator<Item = (f32, u32)>,
    text: &dyn Fn(u32) -> Option<String>,
) {
    w.raw("[");
    for (e, (lp, id)) in entries.enumerate() {
        if e > 0 {
            w.raw(",");
        }
        triple(w, Some(lp), id, text(id).as_deref());
    }
    w.raw("]");
}
