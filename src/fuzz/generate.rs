//! Target `generate`: the sidecar's `/generate` body, checked as its HTTP handler checks it:
//! `serde_json` into [`GenerateRequest`], [`GenerateRequest::validate`], then
//! [`GenerateLimits::check`]. The handler counts a text prompt's tokens with the model's
//! tokenizer, which is not here; its characters stand in for them (ids prompts are exact).
//!
//! Inputs: byte-mutated Atropos requests, and structure-aware objects over the request's keys
//! (plus unknown and duplicate keys) with hostile values.

use arbitrary::{Result as ArbResult, Unstructured};

use crate::engine::protocol::{GenerateLimits, GenerateRequest, LimitExceeded, Prompt, MAX_LOGPROBS, MAX_N};

use super::hostile::{int, json_list, json_number, json_str, json_value, mutate, rare, string, JSON_DICTIONARY};
use super::{ensure, FuzzTarget, Verdict, Violation};

/// The `generate` target.
pub struct GenerateTarget;

/// One case: a body, and the server's limits and context window.
#[derive(Debug, Clone)]
pub struct GenerateCase {
    pub body: Vec<u8>,
    pub limits: GenerateLimits,
    pub context: usize,
}

/// Why the server refuses a body (each a 400 with this message).
#[derive(Debug, thiserror::Error)]
pub enum GenerateRefusal {
    #[error("invalid request: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(crate::engine::protocol::InvalidRequest),
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
}

/// The prompt's length in tokens: exact for ids, characters for text (see the module doc).
fn prompt_tokens(req: &GenerateRequest) -> usize {
    match &req.prompt {
        Prompt::Ids { prompt_token_ids } => prompt_token_ids.len(),
        Prompt::Text(text) => text.chars().count(),
    }
}

/// The handler's checks, in its order.
pub fn server_path(case: &GenerateCase) -> Result<GenerateRequest, GenerateRefusal> {
    let req: GenerateRequest = serde_json::from_slice(&case.body)?;
    req.validate().map_err(GenerateRefusal::Invalid)?;
    case.limits.check(&req, prompt_tokens(&req), case.context)?;
    Ok(req)
}

impl FuzzTarget for GenerateTarget {
    fn name(&self) -> &'static str {
        "generate"
    }

    fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation> {
        let Ok(case) = build(&mut Unstructured::new(data)) else {
            return Ok(Verdict::Rejected("no input"));
        };
        match server_path(&case) {
            Err(GenerateRefusal::Json(_)) => Ok(Verdict::Rejected("json")),
            Err(GenerateRefusal::Invalid(_)) => Ok(Verdict::Rejected("validate")),
            Err(GenerateRefusal::Limit(_)) => Ok(Verdict::Rejected("limits")),
            Ok(req) => check_accepted(&req, &case).map(|()| Verdict::Accepted),
        }
    }

    fn render(&self, data: &[u8]) -> String {
        match build(&mut Unstructured::new(data)) {
            Ok(c) => format!(
                "limits {:?}, context {}, body {}",
                c.limits,
                c.context,
                String::from_utf8_lossy(&c.body)
            ),
            Err(e) => format!("(no input: {e})"),
        }
    }
}

/// What an accepted request must be for the engine.
fn check_accepted(req: &GenerateRequest, case: &GenerateCase) -> Result<(), Violation> {
    let limits = &case.limits;
    ensure(
        (1..=MAX_N.min(limits.max_n)).contains(&req.n),
        "n within 1..=the limits",
        || format!("n = {}", req.n),
    )?;
    ensure(
        (1..=limits.max_tokens).contains(&req.max_tokens) && req.min_tokens <= req.max_tokens,
        "max_tokens within 1..=the limit, min_tokens below it",
        || format!("max_tokens {}, min_tokens {}", req.max_tokens, req.min_tokens),
    )?;
    ensure(
        req.temperature.is_finite() && req.temperature >= 0.0 && req.top_p > 0.0 && req.top_p <= 1.0,
        "sampling parameters in range",
        || format!("temperature {}, top_p {}", req.temperature, req.top_p),
    )?;
    ensure(
        req.logprobs.is_none_or(|k| k <= MAX_LOGPROBS),
        "logprobs within the limit",
        || format!("{:?}", req.logprobs),
    )?;
    let tokens = prompt_tokens(req);
    ensure(
        tokens > 0 || matches!(req.prompt, Prompt::Text(_)),
        "an ids prompt is not empty",
        String::new,
    )?;
    ensure(
        tokens <= limits.max_prompt_tokens.unwrap_or(case.context),
        "the prompt within the limit",
        || format!("{tokens} tokens"),
    )
}

/// Real bodies: what Atropos sends, and the smallest one.
const SEEDS: &[&str] = &[
    r#"{"prompt":{"prompt_token_ids":[1,2]},"logprobs":0,"n":4,"max_tokens":8,"temperature":1.0}"#,
    r#"{"prompt":"hi"}"#,
    r#"{"prompt":"2+2=","n":2,"max_tokens":16,"temperature":0.7,"top_p":0.9,"top_k":40,"stop":["\n"],"stop_token_ids":[2],"seed":7,"logprobs":1,"ignore_eos":false,"min_tokens":1,"include_stop_str_in_output":false,"skip_special_tokens":true}"#,
];

/// A case from bytes.
pub fn build(u: &mut Unstructured) -> ArbResult<GenerateCase> {
    let limits = if u.arbitrary()? {
        GenerateLimits::default()
    } else {
        GenerateLimits {
            max_tokens: *u.choose(&[0usize, 1, 16, 8192, usize::MAX])?,
            max_prompt_tokens: *u.choose(&[None, Some(0), Some(1), Some(10), Some(4096)])?,
            max_n: *u.choose(&[0usize, 1, 4, MAX_N, usize::MAX])?,
        }
    };
    let context = *u.choose(&[0usize, 1, 64, 2048, 131_072])?;
    let body = match u.int_in_range(0..=5u8)? {
        0 => {
            let seed = *u.choose(SEEDS)?;
            mutate(u, seed.as_bytes(), JSON_DICTIONARY)?
        }
        1 => {
            let seed = object(u, false)?;
            mutate(u, seed.as_bytes(), JSON_DICTIONARY)?
        }
        _ => object(u, true)?.into_bytes(),
    };
    Ok(GenerateCase { body, limits, context })
}

/// The request's keys, and the kind of value each takes.
const KEYS: &[(&str, Kind)] = &[
    ("stream", Kind::Bool),
    ("n", Kind::Count(8)),
    ("max_tokens", Kind::Count(512)),
    ("temperature", Kind::Unit(2.0)),
    ("top_p", Kind::Unit(1.0)),
    ("top_k", Kind::Int),
    ("stop", Kind::Stop),
    ("stop_token_ids", Kind::Ids),
    ("seed", Kind::Count(1 << 20)),
    ("logprobs", Kind::Count(5)),
    ("ignore_eos", Kind::Bool),
    ("min_tokens", Kind::Count(4)),
    ("include_stop_str_in_output", Kind::Bool),
    ("skip_special_tokens", Kind::Bool),
    ("presence_penalty", Kind::Neutral(0.0)),
    ("frequency_penalty", Kind::Neutral(0.0)),
    ("repetition_penalty", Kind::Neutral(1.0)),
    ("best_of", Kind::Count(4)),
    ("use_beam_search", Kind::Bool),
];

/// What a key takes: plausible values first, edge ones when hostile.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    /// An integer in `0..=max`.
    Count(u32),
    /// A float in `0..=max`, in tenths.
    Unit(f64),
    /// A float that must stay at this neutral value.
    Neutral(f64),
    Int,
    Stop,
    Ids,
}

/// A request object: a prompt, some keys; `hostile` lets values, types and keys go wrong.
fn object(u: &mut Unstructured, hostile: bool) -> ArbResult<String> {
    let mut out = String::from("{");
    let mut first = true;
    let mut sep = |out: &mut String| {
        if !std::mem::take(&mut first) {
            out.push(',');
        }
    };
    if !hostile || !rare(u, 20)? {
        sep(&mut out);
        out.push_str(r#""prompt":"#);
        prompt(u, &mut out, hostile)?;
    }
    for &(key, kind) in KEYS {
        let unknown = key == "best_of" || key == "use_beam_search";
        let chance = if unknown { 40 } else { 3 };
        if !rare(u, chance)? || (unknown && !hostile) {
            continue;
        }
        let times = if hostile && rare(u, 40)? { 2 } else { 1 };
        for _ in 0..times {
            sep(&mut out);
            json_str(&mut out, key);
            out.push(':');
            if hostile && rare(u, 24)? {
                json_value(u, &mut out, 2)?;
            } else {
                value(u, &mut out, kind, hostile)?;
            }
        }
    }
    out.push('}');
    Ok(out)
}

fn prompt(u: &mut Unstructured, out: &mut String, hostile: bool) -> ArbResult<()> {
    match u.int_in_range(0..=9u8)? {
        0..=3 => json_str(out, &string(u)?),
        4 if hostile => json_value(u, out, 2)?,
        _ => {
            out.push_str(r#"{"prompt_token_ids":"#);
            value(u, out, Kind::Ids, hostile)?;
            if hostile && rare(u, 10)? {
                out.push_str(r#","extra":1"#);
            }
            out.push('}');
        }
    }
    Ok(())
}

fn value(u: &mut Unstructured, out: &mut String, kind: Kind, hostile: bool) -> ArbResult<()> {
    let edge = hostile && rare(u, 8)?;
    match kind {
        Kind::Bool => out.push_str(if u.arbitrary()? { "true" } else { "false" }),
        Kind::Count(_) | Kind::Unit(_) | Kind::Neutral(_) if edge => json_number(u, out)?,
        Kind::Count(max) => out.push_str(&u.int_in_range(0..=max)?.to_string()),
        Kind::Unit(max) => {
            let tenths = u.int_in_range(0..=(max * 10.0) as u32)?;
            out.push_str(&format!("{:.1}", f64::from(tenths) / 10.0));
        }
        Kind::Neutral(x) => out.push_str(&format!("{x:.1}")),
        Kind::Int => out.push_str(&int(u)?.to_string()),
        Kind::Stop if u.arbitrary()? => json_str(out, &string(u)?),
        Kind::Stop => json_list(u, out, 0..=3, |u, out| {
            json_str(out, &string(u)?);
            Ok(())
        })?,
        Kind::Ids => json_list(u, out, 0..=16, |u, out| {
            out.push_str(
                &if edge {
                    int(u)?
                } else {
                    i64::from(u.int_in_range(0..=50_000u32)?)
                }
                .to_string(),
            );
            Ok(())
        })?,
    }
    Ok(())
}
