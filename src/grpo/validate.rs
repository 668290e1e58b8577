//! Validation of scored groups before anything reaches the model. A bad group is rejected
//! with a reason; it is never trained on and never fatal.

use crate::atropos::{EnvId, ScoredGroup};

/// Label value of positions that carry no loss.
pub const IGNORE: i64 = -100;
/// Slack for rollout logprobs that come back a hair above zero from float error.
pub const LOGPROB_SLACK: f64 = 1e-6;

/// What a group is checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Token ids must be below this (the model's vocabulary).
    pub vocab_size: i64,
    /// Longest accepted sequence, in tokens.
    pub seq_len: usize,
    /// Truncate longer sequences to `seq_len` instead of rejecting the group.
    pub truncate_long: bool,
    /// Without `inference_logprobs` the group is rejected unless this is set, in which case the
    /// current policy's detached logprobs stand in (ratio 1, on-policy).
    pub allow_missing_logprobs: bool,
}

/// Why a group was rejected. The `as_str` names are the metric keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The group did not parse as a `ScoredData` object.
    Malformed,
    EmptyGroup,
    ScoreCount,
    NonFiniteScore,
    EmptySequence,
    MaskLength,
    TokenOutOfVocab,
    MaskTokenMismatch,
    NoScoredPosition,
    TooLong,
    LogprobsMissing,
    LogprobsLength,
    LogprobsInvalid,
    AdvantagesLength,
    AdvantagesNonFinite,
    OverridesLength,
}

impl RejectReason {
    /// Every reason, for metric tables.
    pub const ALL: [RejectReason; 16] = [
        Self::Malformed,
        Self::EmptyGroup,
        Self::ScoreCount,
        Self::NonFiniteScore,
        Self::EmptySequence,
        Self::MaskLength,
        Self::TokenOutOfVocab,
        Self::MaskTokenMismatch,
        Self::NoScoredPosition,
        Self::TooLong,
        Self::LogprobsMissing,
        Self::LogprobsLength,
        Self::LogprobsInvalid,
        Self::AdvantagesLength,
        Self::AdvantagesNonFinite,
        Self::OverridesLength,
    ];

    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::EmptyGroup => "empty_group",
            Self::ScoreCount => "score_count",
            Self::NonFiniteScore => "non_finite_score",
            Self::EmptySequence => "empty_sequence",
            Self::MaskLength => "mask_length",
            Self::TokenOutOfVocab => "token_out_of_vocab",
            Self::MaskTokenMismatch => "mask_token_mismatch",
            Self::NoScoredPosition => "no_scored_position",
            Self::TooLong => "too_long",
            Self::LogprobsMissing => "logprobs_missing",
            Self::LogprobsLength => "logprobs_length",
            Self::LogprobsInvalid => "logprobs_invalid",
            Self::AdvantagesLength => "advantages_length",
            Self::AdvantagesNonFinite => "advantages_non_finite",
            Self::OverridesLength => "overrides_length",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected group: the reason, a human detail, and the environment it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
    pub env_id: Option<EnvId>,
}

/// Why a check refused a group, before the group's environment is attached.
type Refusal = (RejectReason, String);

/// Checks a group and returns it ready for packing (truncated if allowed and needed).
pub fn validate(mut group: ScoredGroup, limits: &Limits) -> Result<ScoredGroup, Rejection> {
    let env_id = group.env_id;
    let reject = |(reason, detail): Refusal| Rejection { reason, detail, env_id };
    check_group(&group).map_err(reject)?;
    let logprobs_present = group.inference_logprobs.as_ref().is_some_and(|l| !l.is_empty());
    if !logprobs_present && !limits.allow_missing_logprobs {
        return Err(reject((
            RejectReason::LogprobsMissing,
            "no inference_logprobs (GRPO needs the rollout logprobs; --allow-missing-logprobs trains on-policy instead)".into(),
        )));
    }
    let advantages_present = group.advantages.as_ref().is_some_and(|a| !a.is_empty());
    for i in 0..group.tokens.len() {
        let len = group.tokens[i].len();
        if len > limits.seq_len {
            if !limits.truncate_long {
                return Err(reject((
                    RejectReason::TooLong,
                    format!("sequence {i} has {len} tokens, --seq-len is {}", limits.seq_len),
                )));
            }
            truncate(&mut group, i, limits.seq_len);
        }
        check_sequence(&group, i, limits).map_err(reject)?;
        if logprobs_present {
            check_logprobs(&group, i, len).map_err(reject)?;
        }
        if advantages_present {
            check_advantages(&group, i).map_err(reject)?;
        }
    }
    Ok(group)
}

/// The group as a whole: sequences, one finite score each (whose advantages fit fp32), and one
/// mask and override list each.
fn check_group(group: &ScoredGroup) -> Result<(), Refusal> {
    let n = group.tokens.len();
    if n == 0 {
        return Err((RejectReason::EmptyGroup, "group has no sequences".into()));
    }
    if group.scores.len() != n {
        return Err((
            RejectReason::ScoreCount,
            format!("{} scores for {n} sequences", group.scores.len()),
        ));
    }
    if let Some(i) = group.scores.iter().position(|s| !s.is_finite()) {
        return Err((
            RejectReason::NonFiniteScore,
            format!("score {i} is {}", group.scores[i]),
        ));
    }
    // Advantages are trained on in fp32: a finite score can still overflow the group's mean
    // (scores near f64::MAX) or fp32 itself.
    let advantages = super::advantages::sequence_advantages(group);
    if let Some(i) = advantages.iter().position(|a| !fits_f32(*a)) {
        return Err((
            RejectReason::AdvantagesNonFinite,
            format!(
                "sequence {i}: the group's scores give advantage {} (not a finite fp32)",
                advantages[i]
            ),
        ));
    }
    if group.masks.len() != n {
        return Err((
            RejectReason::MaskLength,
            format!("{} masks for {n} sequences", group.masks.len()),
        ));
    }
    if group.overrides.as_ref().is_some_and(|o| !o.is_empty() && o.len() != n) {
        let len = group.overrides.as_ref().map_or(0, Vec::len);
        return Err((
            RejectReason::OverridesLength,
            format!("{len} overrides for {n} sequences"),
        ));
    }
    Ok(())
}

/// Sequence `i` (already cut to `--seq-len`): tokens in the vocabulary, a mask per token that
/// is -100 or the token, and at least one scored position after the first.
fn check_sequence(group: &ScoredGroup, i: usize, limits: &Limits) -> Result<(), Refusal> {
    let tokens = &group.tokens[i];
    let masks = &group.masks[i];
    if tokens.is_empty() {
        return Err((RejectReason::EmptySequence, format!("sequence {i} is empty")));
    }
    if masks.len() != tokens.len() {
        return Err((
            RejectReason::MaskLength,
            format!("sequence {i}: {} masks for {} tokens", masks.len(), tokens.len()),
        ));
    }
    if let Some(j) = tokens.iter().position(|&t| t < 0 || t >= limits.vocab_size) {
        return Err((
            RejectReason::TokenOutOfVocab,
            format!(
                "sequence {i} position {j}: token {} outside vocabulary 0..{}",
                tokens[j], limits.vocab_size
            ),
        ));
    }
    if let Some(j) = masks.iter().zip(tokens).position(|(&m, &t)| m != IGNORE && m != t) {
        return Err((
            RejectReason::MaskTokenMismatch,
            format!(
                "sequence {i} position {j}: mask {} is neither -100 nor the token {}",
                masks[j], tokens[j]
            ),
        ));
    }
    if !masks.iter().skip(1).any(|&m| m != IGNORE) {
        return Err((
            RejectReason::NoScoredPosition,
            format!("sequence {i} has no scored position"),
        ));
    }
    Ok(())
}

/// Sequence `i`'s rollout logprobs: one per token, finite and at most 0 where scored (`len`:
/// its length before any truncation).
fn check_logprobs(group: &ScoredGroup, i: usize, len: usize) -> Result<(), Refusal> {
    let (tokens, masks) = (&group.tokens[i], &group.masks[i]);
    let lps = group.inference_logprobs.as_ref().and_then(|l| l.get(i));
    let Some(lps) = lps.filter(|l| l.len() == tokens.len()) else {
        let got = lps.map_or(0, Vec::len);
        return Err((
            RejectReason::LogprobsLength,
            format!("sequence {i}: {got} inference_logprobs for {} tokens", tokens.len()),
        ));
    };
    let bad =
        (1..len.min(tokens.len())).find(|&j| masks[j] != IGNORE && !(lps[j].is_finite() && lps[j] <= LOGPROB_SLACK));
    match bad {
        Some(j) => Err((
            RejectReason::LogprobsInvalid,
            format!(
                "sequence {i} position {j}: rollout logprob {} is not a finite value <= 0",
                lps[j]
            ),
        )),
        None => Ok(()),
    }
}

/// Sequence `i`'s per-token advantages (when the group sends them): one per token, finite in
/// fp32.
fn check_advantages(group: &ScoredGroup, i: usize) -> Result<(), Refusal> {
    let tokens = &group.tokens[i];
    let adv = group.advantages.as_ref().and_then(|a| a.get(i));
    let Some(adv) = adv.filter(|a| a.len() == tokens.len()) else {
        return Err((
            RejectReason::AdvantagesLength,
            format!("sequence {i}: advantages do not match its {} tokens", tokens.len()),
        ));
    };
    match adv.iter().position(|a| !fits_f32(*a)) {
        Some(j) => Err((
            RejectReason::AdvantagesNonFinite,
            format!("sequence {i} position {j}: advantage {}", adv[j]),
        )),
        None => Ok(()),
    }
}

/// Whether `x` is finite once stored as fp32.
fn fits_f32(x: f64) -> bool {
    x.is_finite() && x.abs() <= f64::from(f32::MAX)
}

fn truncate(group: &mut ScoredGroup, i: usize, len: usize) {
    group.tokens[i].truncate(len);
    if let Some(m) = group.masks.get_mut(i) {
        m.truncate(len);
    }
    if let Some(l) = group.inference_logprobs.as_mut().and_then(|l| l.get_mut(i)) {
        l.truncate(len);
    }
    if let Some(a) = group.advantages.as_mut().and_then(|a| a.get_mut(i)) {
        a.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            vocab_size: 100,
            seq_len: 8,
            truncate_long: false,
            allow_missing_logprobs: false,
        }
    }

    fn good() -> ScoredGroup {
        ScoredGroup {
            tokens: vec![vec![1, 2, 3, 4], vec![1, 2, 5, 6]],
            masks: vec![vec![-100, -100, 3, 4], vec![-100, -100, 5, 6]],
            scores: vec![1.0, 0.0],
            advantages: None,
            inference_logprobs: Some(vec![vec![1.0, 1.0, -0.5, -0.1], vec![1.0, 1.0, -2.0, -0.3]]),
            overrides: None,
            generation_params: None,
            group_overrides: None,
            env_id: Some(EnvId(3)),
        }
    }

    /// One row per way a group can be malformed: the mutation and the reason it must produce.
    #[test]
    fn malformed_groups_are_rejected_with_their_reason() {
        type Mutation = fn(&mut ScoredGroup);
        let table: Vec<(&str, Mutation, RejectReason)> = vec![
            (
                "no sequences",
                |g| {
                    g.tokens.clear();
                    g.masks.clear();
                    g.scores.clear();
                },
                RejectReason::EmptyGroup,
            ),
            (
                "one score short",
                |g| {
                    g.scores.pop();
                },
                RejectReason::ScoreCount,
            ),
            ("NaN score", |g| g.scores[0] = f64::NAN, RejectReason::NonFiniteScore),
            (
                "infinite score",
                |g| g.scores[1] = f64::INFINITY,
                RejectReason::NonFiniteScore,
            ),
            (
                "scores whose group mean overflows",
                |g| g.scores = vec![1.5e308, 1.5e308],
                RejectReason::AdvantagesNonFinite,
            ),
            (
                "an env advantage past fp32",
                |g| g.advantages = Some(vec![vec![0.0, 0.0, 1e300, 0.0], vec![0.0; 4]]),
                RejectReason::AdvantagesNonFinite,
            ),
            (
                "mask list short",
                |g| {
                    g.masks.pop();
                },
                RejectReason::MaskLength,
            ),
            (
                "mask shorter than tokens",
                |g| {
                    g.masks[1].pop();
                },
                RejectReason::MaskLength,
            ),
            (
                "empty sequence",
                |g| {
                    g.tokens[0].clear();
                    g.masks[0].clear();
                },
                RejectReason::EmptySequence,
            ),
            (
                "token past vocab",
                |g| {
                    g.tokens[0][1] = 100;
                },
                RejectReason::TokenOutOfVocab,
            ),
            (
                "negative token",
                |g| {
                    g.tokens[1][0] = -1;
                },
                RejectReason::TokenOutOfVocab,
            ),
            (
                "mask disagrees with token",
                |g| {
                    g.masks[0][3] = 7;
                },
                RejectReason::MaskTokenMismatch,
            ),
            (
                "nothing scored",
                |g| {
                    g.masks[1] = vec![-100; 4];
                },
                RejectReason::NoScoredPosition,
            ),
            (
                "only position 0 scored",
                |g| {
                    g.masks[1] = vec![1, -100, -100, -100];
                },
                RejectReason::NoScoredPosition,
            ),
            (
                "too long",
                |g| {
                    g.tokens[0] = vec![1; 9];
                    g.masks[0] = vec![1; 9];
                },
                RejectReason::TooLong,
            ),
            (
                "logprobs missing",
                |g| g.inference_logprobs = None,
                RejectReason::LogprobsMissing,
            ),
            (
                "logprobs empty list",
                |g| g.inference_logprobs = Some(vec![]),
                RejectReason::LogprobsMissing,
            ),
            (
                "logprobs row short",
                |g| {
                    if let Some(l) = g.inference_logprobs.as_mut() {
                        l[0].pop();
                    }
                },
                RejectReason::LogprobsLength,
            ),
            (
                "logprobs row missing",
                |g| {
                    if let Some(l) = g.inference_logprobs.as_mut() {
                        l.pop();
                    }
                },
                RejectReason::LogprobsLength,
            ),
            (
                "positive logprob",
                |g| {
                    if let Some(l) = g.inference_logprobs.as_mut() {
                        l[0][2] = 0.5;
                    }
                },
                RejectReason::LogprobsInvalid,
            ),
            (
                "NaN logprob",
                |g| {
                    if let Some(l) = g.inference_logprobs.as_mut() {
                        l[1][3] = f64::NAN;
                    }
                },
                RejectReason::LogprobsInvalid,
            ),
            (
                "advantages short",
                |g| g.advantages = Some(vec![vec![0.0; 4]]),
                RejectReason::AdvantagesLength,
            ),
            (
                "advantages NaN",
                |g| g.advantages = Some(vec![vec![0.0; 4], vec![f64::NAN; 4]]),
                RejectReason::AdvantagesNonFinite,
            ),
            (
                "overrides short",
                |g| g.overrides = Some(vec![None]),
                RejectReason::OverridesLength,
            ),
        ];
        for (name, mutate, reason) in table {
            let mut g = good();
            mutate(&mut g);
            let err = validate(g, &limits()).expect_err(name);
            assert_eq!(err.reason, reason, "{name}: {}", err.detail);
            assert_eq!(err.env_id, Some(EnvId(3)), "{name}: env id is carried");
        }
        validate(good(), &limits()).expect("the unmutated group is valid");
    }

    #[test]
    fn prompt_logprob_sentinels_are_not_checked() {
        let g = good();
        assert_eq!(g.inference_logprobs.as_ref().map(|l| l[0][0]), Some(1.0));
        validate(g, &limits()).expect("1.0 on masked positions is the Atropos convention");
    }

    #[test]
    fn truncation_keeps_aligned_fields() {
        let mut g = good();
        g.tokens[0] = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        g.masks[0] = vec![-100, -100, 3, 4, 5, 6, 7, 8, 9, 10];
        if let Some(l) = g.inference_logprobs.as_mut() {
            l[0] = vec![1.0, 1.0, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1];
        }
        let lim = Limits {
            truncate_long: true,
            ..limits()
        };
        let out = validate(g, &lim).expect("truncated");
        assert_eq!(out.tokens[0].len(), 8);
        assert_eq!(out.masks[0].len(), 8);
        assert_eq!(out.inference_logprobs.as_ref().map(|l| l[0].len()), Some(8));
    }

    #[test]
    fn missing_logprobs_allowed_on_policy() {
        let mut g = good();
        g.inference_logprobs = None;
        let lim = Limits {
            allow_missing_logprobs: true,
            ..limits()
        };
        validate(g, &lim).expect("on-policy mode accepts groups without logprobs");
    }
}
