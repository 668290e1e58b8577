//! Target `batch`: what the learner does with a `GET /batch` body. The body is parsed as
//! [`crate::atropos::AtroposClient`] parses it, mapped to groups as its `poll_batch` does,
//! round-tripped through the spool's JSON, and handed to the preprocessor's
//! [`prepare_with`]: each group parsed, checked by `grpo::validate`, aligned and packed by
//! `grpo::pack`. Accepted batches must be what the trainer expects: shapes that add up, ids
//! inside the vocabulary, finite f32 advantages.
//!
//! Inputs: byte-mutated valid bodies, and structure-aware bodies (the `ScoredData` shape with
//! hostile values: ids outside the vocabulary, mismatched lengths, numbers such as `1e308`,
//! `NaN` or `1e309`, wrong types, nesting past serde_json's recursion limit).

use arbitrary::{Result as ArbResult, Unstructured};
use serde_json::Value;

use crate::actors::messages::{PreparedBatch, RawBatch};
use crate::actors::preprocessor::prepare_with;
use crate::atropos::{AtroposError, BatchPoll};
use crate::checkpoint::BatchSeq;
use crate::grpo::pack::{MicroBatch, Packing, PAD_MULTIPLE};
use crate::grpo::validate::IGNORE;
use crate::grpo::Limits;

use super::hostile::{
    int, json_list, json_number, json_str, json_value, mutate, not_json_number, rare, string, JSON_DICTIONARY,
};
use super::{ensure, FuzzTarget, Verdict, Violation};

/// The `batch` target.
pub struct BatchTarget;

/// One case: a body and the learner settings it meets.
#[derive(Debug, Clone)]
pub struct BatchCase {
    pub body: Vec<u8>,
    pub limits: Limits,
    pub micro_batch: usize,
    pub packing: Packing,
}

/// What the learner made of a body.
#[derive(Debug)]
pub enum BodyOutcome {
    /// `{"batch": null}`: nothing ready.
    Empty,
    /// The API lost the registration.
    NotRegistered,
    /// A batch of `groups` groups, prepared.
    Batch { groups: usize, prepared: PreparedBatch },
}

/// `GET /batch`'s body as the client maps it: the JSON parse (as `read_json` does it), then
/// the client's own [`crate::atropos::client::batch_reply`].
pub fn poll_body(body: &[u8]) -> Result<BatchPoll, AtroposError> {
    let protocol = |reason: String| AtroposError::Protocol {
        endpoint: "/batch",
        reason,
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| protocol(e.to_string()))?;
    crate::atropos::client::batch_reply(v)
}

/// The spool's round trip (`Spool::write` then `Spool::read`, without the files).
fn spool_round_trip(groups: &[Value]) -> std::result::Result<Vec<Value>, serde_json::Error> {
    serde_json::from_slice(&serde_json::to_vec(groups)?)
}

/// The learner's whole path for one body: parse, map, prepare.
pub fn learner_path(case: &BatchCase) -> Result<BodyOutcome, AtroposError> {
    Ok(match poll_body(&case.body)? {
        BatchPoll::Empty => BodyOutcome::Empty,
        BatchPoll::NotRegistered => BodyOutcome::NotRegistered,
        BatchPoll::Batch(groups) => prepare_groups(groups, case),
    })
}

/// The preprocessor's half: the groups of one batch, parsed, validated and packed.
fn prepare_groups(groups: Vec<Value>, case: &BatchCase) -> BodyOutcome {
    let raw = RawBatch {
        seq: BatchSeq(1),
        groups,
        wait_time_s: 0.0,
    };
    let groups = raw.groups.len();
    let prepared = prepare_with(raw, &case.limits, case.micro_batch, case.packing);
    BodyOutcome::Batch { groups, prepared }
}

impl FuzzTarget for BatchTarget {
    fn name(&self) -> &'static str {
        "batch"
    }

    fn case(&mut self, data: &[u8]) -> Result<Verdict, Violation> {
        let Ok(case) = build(&mut Unstructured::new(data)) else {
            return Ok(Verdict::Rejected("no input"));
        };
        let groups = match poll_body(&case.body) {
            Err(_) => return Ok(Verdict::Rejected("body")),
            Ok(BatchPoll::Empty | BatchPoll::NotRegistered) => return Ok(Verdict::Accepted),
            Ok(BatchPoll::Batch(groups)) => groups,
        };
        let back = spool_round_trip(&groups);
        ensure(
            back.as_ref().is_ok_and(|b| b.len() == groups.len()),
            "the spool round trip keeps every group",
            || format!("{:?}", back.map(|b| b.len())),
        )?;
        let BodyOutcome::Batch { groups, prepared } = prepare_groups(groups, &case) else {
            return Ok(Verdict::Accepted);
        };
        check_prepared(&prepared, groups, &case)?;
        Ok(match prepared.rejections.first() {
            Some(r) if prepared.batch.is_none() => Verdict::Rejected(r.reason.as_str()),
            _ => Verdict::Accepted,
        })
    }

    fn render(&self, data: &[u8]) -> String {
        match build(&mut Unstructured::new(data)) {
            Ok(c) => format!(
                "limits {:?}, micro_batch {}, packing {:?}, body {}",
                c.limits,
                c.micro_batch,
                c.packing,
                String::from_utf8_lossy(&c.body)
            ),
            Err(e) => format!("(no input: {e})"),
        }
    }
}

/// A case from bytes: the learner's settings, then a body (mutated, structured or raw).
pub fn build(u: &mut Unstructured) -> ArbResult<BatchCase> {
    let limits = Limits {
        vocab_size: *u.choose(&[2i64, 16, 100, 1000, 32_000, 151_936])?,
        seq_len: *u.choose(&[2usize, 3, 8, 64, 100, 2048])?,
        truncate_long: u.arbitrary()?,
        allow_missing_logprobs: u.arbitrary()?,
    };
    let micro_batch = *u.choose(&[0usize, 1, 2, 3, 4, 8, 32])?;
    let packing = if u.arbitrary()? {
        Packing::Sorted
    } else {
        Packing::Padded
    };
    let body = match u.int_in_range(0..=19u8)? {
        0..=3 => {
            let seed = if rare(u, 4)? {
                u.choose(SEEDS)?.to_string()
            } else {
                body(u, &limits, Mood::CALM)?
            };
            mutate(u, seed.as_bytes(), JSON_DICTIONARY)?
        }
        4 => u.bytes(u.len().min(512))?.to_vec(),
        _ => {
            let mood = Mood::hostile(u)?;
            body(u, &limits, mood)?.into_bytes()
        }
    };
    Ok(BatchCase {
        body,
        limits,
        micro_batch,
        packing,
    })
}

/// Real bodies: the worked example of the Atropos contract, and the other answer shapes.
const SEEDS: &[&str] = &[
    r#"{"batch":[{"tokens":[[101,102,103,104,201,202,203],[101,102,103,104,211,212]],"masks":[[-100,-100,-100,-100,201,202,203],[-100,-100,-100,-100,211,212]],"scores":[1.0,-1.0],"inference_logprobs":[[1,1,1,1,-0.5,-0.25,-0.125],[1,1,1,1,-0.5,-0.25]],"generation_params":{"temperature":0.7},"env_id":0}]}"#,
    r#"{"batch":[{"tokens":[[1,2,3],[1,2,3],[1,2,3]],"masks":[[-100,2,3],[-100,2,3],[-100,2,3]],"scores":[1.0,0.0,0.5],"advantages":[[9,8,7],[6,5,4],[3,2,1]],"overrides":[null,{"set_advantage_to_zero":true},{}],"inference_logprobs":[[1,-1,-1],[1,-1,-1],[1,-1,-1]]}]}"#,
    r#"{"batch":null}"#,
    r#"{"status":"error","message":"Trainer not registered"}"#,
];

/// How hostile a structured body is: not at all, or often (scale 1) to seldom (scale 16);
/// `invalid` also allows number texts that are not JSON.
#[derive(Debug, Clone, Copy)]
struct Mood {
    scale: u32,
    invalid: bool,
}

impl Mood {
    const CALM: Mood = Mood {
        scale: 0,
        invalid: false,
    };

    fn hostile(u: &mut Unstructured) -> ArbResult<Mood> {
        Ok(Mood {
            scale: *u.choose(&[1, 4, 16])?,
            invalid: rare(u, 8)?,
        })
    }

    fn on(self) -> bool {
        self.scale > 0
    }

    /// True about once in `n x scale` calls, never when calm.
    fn odd(self, u: &mut Unstructured, n: u32) -> ArbResult<bool> {
        if self.on() {
            rare(u, n * self.scale)
        } else {
            Ok(false)
        }
    }
}

/// A body of the `/batch` shape; a hostile `mood` lets values, types and shapes go wrong.
fn body(u: &mut Unstructured, limits: &Limits, mood: Mood) -> ArbResult<String> {
    let mut out = String::new();
    if mood.odd(u, 12)? {
        match u.int_in_range(0..=3u8)? {
            0 => out.push_str(r#"{"batch":null}"#),
            1 => {
                out.push_str(r#"{"status":"error","message":"#);
                json_str(&mut out, &format!("Trainer {} registered", string(u)?));
                out.push('}');
            }
            2 => {
                out.push_str(r#"{"batch":"#);
                json_value(u, &mut out, 3)?;
                out.push('}');
            }
            _ => json_value(u, &mut out, 3)?,
        }
        return Ok(out);
    }
    out.push_str(r#"{"batch":"#);
    json_list(u, &mut out, 0..=6, |u, out| group(u, out, limits, mood))?;
    out.push('}');
    Ok(out)
}

/// Per-sequence lengths and prompt lengths of a group.
struct Shape {
    lens: Vec<usize>,
    prompts: Vec<usize>,
    tokens: Vec<Vec<i64>>,
}

fn shape(u: &mut Unstructured, limits: &Limits, mood: Mood) -> ArbResult<Shape> {
    let n = if mood.odd(u, 20)? {
        u.int_in_range(0..=40usize)?
    } else {
        u.int_in_range(1..=6usize)?
    };
    let longest = (limits.seq_len + 3).min(48);
    let (mut lens, mut prompts, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let low = if mood.odd(u, 30)? { 0 } else { 2 };
        let len = u.int_in_range(low..=longest.max(low))?;
        prompts.push(u.int_in_range(0..=len.saturating_sub(1))?);
        let row = (0..len)
            .map(|_| token(u, limits.vocab_size, mood))
            .collect::<ArbResult<Vec<i64>>>()?;
        lens.push(len);
        tokens.push(row);
    }
    Ok(Shape { lens, prompts, tokens })
}

fn token(u: &mut Unstructured, vocab: i64, mood: Mood) -> ArbResult<i64> {
    if mood.odd(u, 64)? {
        return Ok(match u.int_in_range(0..=2u8)? {
            0 => vocab,
            1 => -1,
            _ => int(u)?,
        });
    }
    u.int_in_range(0..=vocab - 1)
}

/// Writes `"key":` (after a comma unless `out` is just its `{`), then `value` or, when the
/// mood strikes, any JSON value.
fn field(
    u: &mut Unstructured,
    out: &mut String,
    key: &str,
    mood: Mood,
    value: impl FnOnce(&mut Unstructured, &mut String) -> ArbResult<()>,
) -> ArbResult<()> {
    if out.len() > 1 {
        out.push(',');
    }
    json_str(out, key);
    out.push(':');
    if mood.odd(u, 40)? {
        json_value(u, out, 2)
    } else {
        value(u, out)
    }
}

/// A number list of `n` items: `normal(i)` mostly, a hostile number text sometimes.
fn numbers(
    u: &mut Unstructured,
    out: &mut String,
    n: usize,
    mood: Mood,
    mut normal: impl FnMut(&mut Unstructured, usize) -> ArbResult<String>,
) -> ArbResult<()> {
    let n = if mood.odd(u, 40)? {
        n.saturating_sub(1) + 2 * usize::from(u.arbitrary::<bool>()?)
    } else {
        n
    };
    out.push('[');
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        if mood.odd(u, 48)? {
            if mood.invalid && rare(u, 4)? {
                not_json_number(u, out)?;
            } else {
                json_number(u, out)?;
            }
        } else {
            out.push_str(&normal(u, i)?);
        }
    }
    out.push(']');
    Ok(())
}

/// One `ScoredData` group.
fn group(u: &mut Unstructured, out: &mut String, limits: &Limits, mood: Mood) -> ArbResult<()> {
    let s = shape(u, limits, mood)?;
    let n = s.lens.len();
    let token = |i: usize, j: usize| s.tokens[i].get(j).copied().unwrap_or(1);
    let mut obj = String::from("{");
    field(u, &mut obj, "tokens", mood, |u, out| {
        rows(u, out, &s, mood, |_, i, j| Ok(token(i, j).to_string()))
    })?;
    field(u, &mut obj, "masks", mood, |u, out| {
        rows(u, out, &s, mood, |_, i, j| {
            Ok(if j < s.prompts[i] { IGNORE } else { token(i, j) }.to_string())
        })
    })?;
    field(u, &mut obj, "scores", mood, |u, out| {
        numbers(u, out, n, mood, |u, _| {
            Ok(format!("{}", f64::from(u.int_in_range(-4..=4i8)?) / 2.0))
        })
    })?;
    if !rare(u, 5)? {
        field(u, &mut obj, "inference_logprobs", mood, |u, out| {
            rows(u, out, &s, mood, |u, i, j| {
                Ok(if j < s.prompts[i] {
                    "1.0".into()
                } else {
                    format!("-{}e-3", u.int_in_range(0..=9000u16)?)
                })
            })
        })?;
    }
    if rare(u, 4)? {
        field(u, &mut obj, "advantages", mood, |u, out| {
            rows(u, out, &s, mood, |u, _, _| Ok(format!("{}", u.int_in_range(-3..=3i8)?)))
        })?;
    }
    extras(u, &mut obj, n, mood)?;
    out.push_str(&obj);
    out.push('}');
    Ok(())
}

/// Per-sequence lists of per-position numbers.
fn rows(
    u: &mut Unstructured,
    out: &mut String,
    s: &Shape,
    mood: Mood,
    mut item: impl FnMut(&mut Unstructured, usize, usize) -> ArbResult<String>,
) -> ArbResult<()> {
    out.push('[');
    for (i, &len) in s.lens.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        numbers(u, out, len, mood, |u, j| item(u, i, j))?;
    }
    out.push(']');
    Ok(())
}

/// The optional fields: overrides, generation params, env id, unknown keys.
fn extras(u: &mut Unstructured, out: &mut String, n: usize, mood: Mood) -> ArbResult<()> {
    let temperature = |u: &mut Unstructured, out: &mut String| -> ArbResult<()> {
        out.push_str(r#"{"temperature":"#);
        if mood.odd(u, 4)? {
            json_number(u, out)?;
        } else {
            out.push_str(&format!("0.{}", u.int_in_range(1..=9u8)?));
        }
        out.push('}');
        Ok(())
    };
    if rare(u, 4)? {
        field(u, out, "overrides", mood, |u, out| {
            json_list(u, out, n..=n, |u, out| {
                match u.int_in_range(0..=3u8)? {
                    0 => out.push_str("null"),
                    1 => temperature(u, out)?,
                    2 if mood.on() => {
                        out.push_str(r#"{"set_advantage_to_zero":"#);
                        json_value(u, out, 1)?;
                        out.push('}');
                    }
                    _ => out.push_str(r#"{"set_advantage_to_zero":true}"#),
                }
                Ok(())
            })
        })?;
    }
    if rare(u, 4)? {
        field(u, out, "generation_params", mood, temperature)?;
    }
    if rare(u, 8)? {
        field(u, out, "group_overrides", mood, temperature)?;
    }
    if rare(u, 2)? {
        field(u, out, "env_id", mood, |u, out| {
            out.push_str(&int(u)?.to_string());
            Ok(())
        })?;
    }
    if mood.odd(u, 8)? {
        let key = *u.choose(&["messages", "images", "distill_token_ids", "tokens", "scores"])?;
        field(u, out, key, mood, |u, out| json_value(u, out, 3))?;
    }
    Ok(())
}

/// What an accepted batch must be for the trainer.
pub fn check_prepared(p: &PreparedBatch, groups: usize, case: &BatchCase) -> Result<(), Violation> {
    ensure(
        p.batch.is_none() == (p.rejections.len() == groups),
        "a batch exactly when a group survives",
        || {
            format!(
                "{} of {groups} groups rejected, batch {}",
                p.rejections.len(),
                p.batch.is_some()
            )
        },
    )?;
    if let Some(r) = p.rejections.iter().find(|r| r.detail.is_empty()) {
        return Err(Violation {
            check: "every rejection explains itself",
            detail: format!("{} with no detail", r.reason),
        });
    }
    let Some(b) = &p.batch else { return Ok(()) };
    let rows: usize = b.micro_batches.iter().map(|m| m.rows).sum();
    ensure(rows == b.sequences, "micro-batch rows add up to the sequences", || {
        format!("{rows} rows for {} sequences", b.sequences)
    })?;
    ensure(
        b.scored_tokens >= b.sequences,
        "every sequence has a scored token",
        || format!("{} scored tokens for {} sequences", b.scored_tokens, b.sequences),
    )?;
    b.micro_batches.iter().try_for_each(|mb| check_micro(mb, case))
}

fn check_micro(mb: &MicroBatch, case: &BatchCase) -> Result<(), Violation> {
    let cells = mb.rows * mb.seq_len;
    let widest = case.limits.seq_len.div_ceil(PAD_MULTIPLE).max(1) * PAD_MULTIPLE;
    ensure(
        (1..=case.micro_batch.max(1)).contains(&mb.rows)
            && mb.seq_len.is_multiple_of(PAD_MULTIPLE)
            && mb.seq_len <= widest,
        "micro-batch shape",
        || format!("{} rows x {} positions", mb.rows, mb.seq_len),
    )?;
    let lens = [
        mb.input_ids.len(),
        mb.labels.len(),
        mb.ref_logprobs.len(),
        mb.advantages.len(),
    ];
    ensure(
        lens.iter().all(|&l| l == cells) && mb.on_policy.len() == mb.rows && mb.temperatures.len() == mb.rows,
        "micro-batch arrays match its shape",
        || format!("{lens:?} for {cells} cells"),
    )?;
    let vocab = 0..case.limits.vocab_size;
    first_bad(&mb.input_ids, |t| vocab.contains(t), "input ids inside the vocabulary")?;
    first_bad(
        &mb.labels,
        |t| *t == IGNORE || vocab.contains(t),
        "labels inside the vocabulary",
    )?;
    // Every position's advantage meets a weight (0 where unscored): inf or NaN makes the loss
    // NaN. Rollout logprobs and temperatures need no check here: the loss clamps the log-ratio
    // (an infinite logprob gives a finite ratio) and treats a temperature <= 0 as 1.
    first_bad(&mb.advantages, |a| a.is_finite(), "advantages are finite f32")?;
    let unscored = mb
        .labels
        .chunks(mb.seq_len.max(1))
        .position(|row| row.iter().all(|&l| l == IGNORE));
    ensure(unscored.is_none(), "every row has a scored label", || {
        format!("row {unscored:?}")
    })
}

fn first_bad<T: std::fmt::Debug>(xs: &[T], ok: impl Fn(&T) -> bool, check: &'static str) -> Result<(), Violation> {
    match xs.iter().position(|x| !ok(x)) {
        None => Ok(()),
        Some(i) => Err(Violation {
            check,
            detail: format!("position {i} holds {:?}", xs[i]),
        }),
    }
}
