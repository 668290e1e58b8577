//! Alignment and packing: each valid sequence becomes shifted inputs/labels/rollout logprobs
//! and per-position advantages. Then either sequences are sorted by length and cut into
//! micro-batches of at most `micro_batch` rows, each padded to a multiple of 64 positions, or
//! (token-budget packing, [`pack_tokens`]) laid end to end into micro-batches of at most a
//! token budget, with no padding at all.

use crate::atropos::ScoredGroup;

use super::advantages::{sequence_advantages, temperature, zeroed};
use super::validate::IGNORE;

/// Positions of a micro-batch are padded to a multiple of this.
pub const PAD_MULTIPLE: usize = 64;
/// Input id used for padding (never scored, never attended to by earlier positions).
pub const PAD_ID: i64 = 0;

/// One aligned sequence: position `p` predicts `labels[p]` from `input_ids[..=p]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// Rollout logprob of `labels[p]`; `None` for on-policy rows (no rollout logprobs).
    pub ref_logprobs: Option<Vec<f32>>,
    pub advantages: Vec<f32>,
    pub temperature: f32,
    /// The environment's raw score of this sequence.
    pub score: f64,
}

impl Sequence {
    /// Scored positions.
    pub fn scored(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Aligns every sequence of a validated group.
pub fn align_group(group: &ScoredGroup) -> Vec<Sequence> {
    let seq_adv = sequence_advantages(group);
    let token_adv = group.advantages.as_ref().filter(|a| !a.is_empty());
    let logprobs = group.inference_logprobs.as_ref().filter(|l| !l.is_empty());
    (0..group.tokens.len())
        .map(|i| {
            let tokens = &group.tokens[i];
            let n = tokens.len();
            let advantages = match token_adv {
                Some(adv) if !zeroed(group, i) => adv[i][1..n].iter().map(|&a| a as f32).collect(),
                Some(_) => vec![0.0; n - 1],
                None => vec![seq_adv[i] as f32; n - 1],
            };
            Sequence {
                input_ids: tokens[..n - 1].to_vec(),
                labels: group.masks[i][1..n].to_vec(),
                ref_logprobs: logprobs.map(|l| l[i][1..n].iter().map(|&x| x as f32).collect()),
                advantages,
                temperature: temperature(group, i) as f32,
                score: group.scores[i],
            }
        })
        .collect()
}

/// Row-major `[rows, seq_len]` arrays of one micro-batch, ready to become tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MicroBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// 1.0 where there is no rollout logprob (padding, prompt, on-policy rows).
    pub ref_logprobs: Vec<f32>,
    /// Per row: true when the row has no rollout logprobs and trains on-policy.
    pub on_policy: Vec<bool>,
    pub advantages: Vec<f32>,
    pub temperatures: Vec<f32>,
    /// Token-budget packing: the lengths of the segments laid end to end in the one row (they
    /// sum to `seq_len`), and `on_policy`/`temperatures` are per segment. Empty in the padded
    /// layout, where each row is one sequence.
    #[serde(default)]
    pub seq_lens: Vec<usize>,
    /// Shared prompts: per segment, the segment (index) holding the prompt it continues, whose
    /// positions it also attends to; `None` for a whole sequence or a shared prompt itself.
    #[serde(default)]
    pub seq_parents: Vec<Option<usize>>,
    /// Per segment, the RoPE position of its first token (the parent's length for a
    /// continuation, else 0). Empty: all 0.
    #[serde(default)]
    pub seq_offsets: Vec<usize>,
}

impl MicroBatch {
    /// Whether sequences are laid end to end in one row (token-budget packing).
    pub fn is_packed(&self) -> bool {
        !self.seq_lens.is_empty()
    }
}

/// Everything one optimizer step trains on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainBatch {
    pub micro_batches: Vec<MicroBatch>,
    pub sequences: usize,
    pub scored_tokens: usize,
    /// Sum of the raw scores of the sequences (for the reward metric).
    pub score_sum: f64,
}

fn padded_len(longest: usize) -> usize {
    longest.div_ceil(PAD_MULTIPLE).max(1) * PAD_MULTIPLE
}

/// Which micro-batches of `batch` each of `ranks` data-parallel ranks trains: largest first
/// (by positions computed), each to the least-loaded rank (the lowest on a tie); every rank's
/// list in batch order. Every micro-batch goes to exactly one rank, and every rank computes
/// the same split.
pub fn share_micro_batches(batch: &TrainBatch, ranks: usize) -> Vec<Vec<usize>> {
    let ranks = ranks.max(1);
    let mut order: Vec<usize> = (0..batch.micro_batches.len()).collect();
    let size = |i: usize| batch.micro_batches[i].rows * batch.micro_batches[i].seq_len;
    order.sort_by(|&a, &b| size(b).cmp(&size(a)).then(a.cmp(&b)));
    let mut load = vec![0usize; ranks];
    let mut shares = vec![Vec::new(); ranks];
    for i in order {
        let (r, _) = load.iter().enumerate().min_by_key(|&(r, l)| (*l, r)).unwrap_or((0, &0));
        load[r] += size(i);
        shares[r].push(i);
    }
    for share in &mut shares {
        share.sort_unstable();
    }
    shares
}

/// How sequences become micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Packing {
    /// Longest first, each micro-batch padded to its own longest row: rows of similar length
    /// share a micro-batch and padding stays small.
    Sorted,
    /// Arrival order, every micro-batch padded to the batch's longest row (the Atropos example
    /// trainer's layout; kept for benchmarks).
    Padded,
}

/// Packs sequences into micro-batches of at most `micro_batch` rows, sorted by length.
pub fn pack(sequences: Vec<Sequence>, micro_batch: usize) -> TrainBatch {
    pack_with(sequences, micro_batch, Packing::Sorted)
}

/// Packs sequences into micro-batches of at most `micro_batch` rows as `packing` says.
pub fn pack_with(mut sequences: Vec<Sequence>, micro_batch: usize, packing: Packing) -> TrainBatch {
    let total = sequences.len();
    let scored_tokens = sequences.iter().map(Sequence::scored).sum();
    let score_sum = sequences.iter().map(|s| s.score).sum();
    let longest = sequences.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    if packing == Packing::Sorted {
        sequences.sort_by_key(|s| std::cmp::Reverse(s.input_ids.len()));
    }
    let micro_batches = sequences
        .chunks(micro_batch.max(1))
        .map(|chunk| {
            let seq_len = match packing {
                Packing::Sorted => padded_len(chunk.iter().map(|s| s.input_ids.len()).max().unwrap_or(0)),
                Packing::Padded => padded_len(longest),
            };
            let rows = chunk.len();
            let mut mb = MicroBatch {
                rows,
                seq_len,
                input_ids: vec![PAD_ID; rows * seq_len],
                labels: vec![IGNORE; rows * seq_len],
                ref_logprobs: vec![1.0; rows * seq_len],
                on_policy: Vec::with_capacity(rows),
                advantages: vec![0.0; rows * seq_len],
                temperatures: Vec::with_capacity(rows),
                seq_lens: Vec::new(),
                seq_parents: Vec::new(),
                seq_offsets: Vec::new(),
            };
            for (r, s) in chunk.iter().enumerate() {
                let at = r * seq_len;
                let n = s.input_ids.len();
                mb.input_ids[at..at + n].copy_from_slice(&s.input_ids);
                mb.labels[at..at + n].copy_from_slice(&s.labels);
                mb.advantages[at..at + n].copy_from_slice(&s.advantages);
                if let Some(lp) = &s.ref_logprobs {
                    mb.ref_logprobs[at..at + n].copy_from_slice(lp);
                }
                mb.on_policy.push(s.ref_logprobs.is_none());
                mb.temperatures.push(s.temperature);
            }
            mb
        })
        .collect();
    TrainBatch {
        micro_batches,
        sequences: total,
        scored_tokens,
        score_sum,
    }
}

/// Which sequences (indices into `lens`) share each micro-batch of at most `budget` tokens:
/// longest first, each into the first micro-batch with room (first-fit decreasing), a new one
/// when none has. A sequence longer than the budget gets a micro-batch of its own. Every index
/// is placed exactly once.
pub fn plan_token_budget(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        match bins.iter_mut().find(|(used, _)| used + lens[i] <= budget) {
            Some((used, members)) => {
                *used += lens[i];
                members.push(i);
            }
            None => bins.push((lens[i], vec![i])),
        }
    }
    bins.into_iter().map(|(_, members)| members).collect()
}

/// `--shared-prompt on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedPrompt {
    On,
    #[default]
    Off,
}

/// How a batch's sequences are laid out in micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// At most `micro_batch` sequences per micro-batch, one per row, padded.
    Rows { micro_batch: usize, packing: Packing },
    /// End to end in one row of at most `budget` tokens (`--micro-batch-tokens`), no padding;
    /// with `shared_prompt`, each group's common prompt once (`--shared-prompt on`).
    Tokens { budget: usize, shared_prompt: bool },
}

/// Packs each group's `sequences` as `layout` says.
pub fn pack_as(groups: Vec<Vec<Sequence>>, layout: Layout) -> TrainBatch {
    match layout {
        Layout::Rows { micro_batch, packing } => pack_with(groups.concat(), micro_batch, packing),
        Layout::Tokens {
            budget,
            shared_prompt: false,
        } => pack_tokens(groups.concat(), budget),
        Layout::Tokens {
            budget,
            shared_prompt: true,
        } => pack_shared(groups, budget),
    }
}

/// The length of the prompt every sequence of a group shares and trains nothing on: the
/// longest common prefix of their inputs whose labels are all ignored, leaving each sequence at
/// least one position of its own. 0 when there is nothing to share (one sequence, or no common
/// unscored prefix).
pub fn shared_prefix(group: &[Sequence]) -> usize {
    let Some(first) = group.first() else { return 0 };
    if group.len() < 2 {
        return 0;
    }
    let shortest = group.iter().map(|s| s.input_ids.len()).min().unwrap_or(0);
    let mut n = 0;
    while n + 1 < shortest
        && group
            .iter()
            .all(|s| s.input_ids[n] == first.input_ids[n] && s.labels[n] == IGNORE)
    {
        n += 1;
    }
    n
}

/// Appends positions `range` of `s` to `mb` as one segment.
fn push_segment(mb: &mut MicroBatch, s: &Sequence, range: std::ops::Range<usize>, parent: Option<usize>) {
    let (from, n) = (range.start, range.len());
    mb.input_ids.extend_from_slice(&s.input_ids[range.clone()]);
    mb.labels.extend_from_slice(&s.labels[range.clone()]);
    mb.advantages.extend_from_slice(&s.advantages[range.clone()]);
    match &s.ref_logprobs {
        Some(lp) => mb.ref_logprobs.extend_from_slice(&lp[range]),
        None => mb.ref_logprobs.extend(std::iter::repeat_n(1.0, n)),
    }
    mb.on_policy.push(s.ref_logprobs.is_none());
    mb.temperatures.push(s.temperature);
    mb.seq_lens.push(n);
    mb.seq_parents.push(parent);
    mb.seq_offsets.push(from);
    mb.seq_len += n;
}

fn empty_packed() -> MicroBatch {
    MicroBatch {
        rows: 1,
        seq_len: 0,
        input_ids: Vec::new(),
        labels: Vec::new(),
        ref_logprobs: Vec::new(),
        on_policy: Vec::new(),
        advantages: Vec::new(),
        temperatures: Vec::new(),
        seq_lens: Vec::new(),
        seq_parents: Vec::new(),
        seq_offsets: Vec::new(),
    }
}

/// Shared-prompt packing: each group's shared prompt ([`shared_prefix`]) is laid down once,
/// followed by the rest of each of its sequences, which attend to the prompt's positions and
/// their own; groups stay whole within a micro-batch of at most `budget` tokens (a group larger
/// than the budget gets one of its own). Exact: every sequence sees what it would alone.
pub fn pack_shared(groups: Vec<Vec<Sequence>>, budget: usize) -> TrainBatch {
    let all: Vec<&Sequence> = groups.iter().flatten().collect();
    let total = all.len();
    let scored_tokens = all.iter().map(|s| s.scored()).sum();
    let score_sum = all.iter().map(|s| s.score).sum();
    let prefixes: Vec<usize> = groups.iter().map(|g| shared_prefix(g)).collect();
    let sizes: Vec<usize> = groups
        .iter()
        .zip(&prefixes)
        .map(|(g, &p)| p + g.iter().map(|s| s.input_ids.len() - p).sum::<usize>())
        .collect();
    let micro_batches = plan_token_budget(&sizes, budget.max(1))
        .into_iter()
        .map(|members| {
            let mut mb = empty_packed();
            for gi in members {
                let (group, p) = (&groups[gi], prefixes[gi]);
                let parent = (p > 0).then(|| {
                    push_segment(&mut mb, &group[0], 0..p, None);
                    mb.seq_lens.len() - 1
                });
                for s in group {
                    push_segment(&mut mb, s, p..s.input_ids.len(), parent);
                }
            }
            mb
        })
        .collect();
    TrainBatch {
        micro_batches,
        sequences: total,
        scored_tokens,
        score_sum,
    }
}

/// Token-budget packing: sequences laid end to end into micro-batches of at most `budget`
/// tokens ([`plan_token_budget`]), one row each and no padding. Attention and positions restart
/// at every sequence (see [`MicroBatch::seq_lens`]).
pub fn pack_tokens(sequences: Vec<Sequence>, budget: usize) -> TrainBatch {
    let total = sequences.len();
    let scored_tokens = sequences.iter().map(Sequence::scored).sum();
    let score_sum = sequences.iter().map(|s| s.score).sum();
    let lens: Vec<usize> = sequences.iter().map(|s| s.input_ids.len()).collect();
    let micro_batches = plan_token_budget(&lens, budget.max(1))
        .into_iter()
        .map(|members| {
            let mut mb = empty_packed();
            for &i in &members {
                push_segment(&mut mb, &sequences[i], 0..lens[i], None);
            }
            mb
        })
        .collect();
    TrainBatch {
        micro_batches,
        sequences: total,
        scored_tokens,
        score_sum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The worked example of the Atropos contract (section 3.3).
    #[test]
    fn aligns_like_the_example_trainer() {
        let g: ScoredGroup = serde_json::from_value(json!({
            "tokens": [[101,102,103,104,201,202,203],[101,102,103,104,211,212]],
            "masks": [[-100,-100,-100,-100,201,202,203],[-100,-100,-100,-100,211,212]],
            "scores": [1.0,-1.0],
            "inference_logprobs": [[1,1,1,1,-0.5,-0.25,-0.125],[1,1,1,1,-0.5,-0.25]],
            "generation_params": {"temperature": 0.7}
        }))
        .expect("group");
        let seqs = align_group(&g);
        assert_eq!(seqs[0].input_ids, vec![101, 102, 103, 104, 201, 202]);
        assert_eq!(seqs[0].labels, vec![-100, -100, -100, 201, 202, 203]);
        assert_eq!(seqs[0].ref_logprobs, Some(vec![1.0, 1.0, 1.0, -0.5, -0.25, -0.125]));
        assert_eq!(seqs[0].advantages, vec![1.0; 6]);
        assert_eq!(seqs[1].advantages, vec![-1.0; 5]);
        assert_eq!(seqs[0].temperature, 0.7);
        let batch = pack(seqs, 4);
        assert_eq!(batch.micro_batches.len(), 1);
        let mb = &batch.micro_batches[0];
        assert_eq!((mb.rows, mb.seq_len), (2, 64));
        assert_eq!(&mb.labels[64..70], &[-100, -100, -100, 211, 212, -100]);
        assert_eq!(batch.scored_tokens, 5);
    }

    #[test]
    fn env_advantages_are_shifted_and_micro_batches_cut() {
        let g: ScoredGroup = serde_json::from_value(json!({
            "tokens": [[1,2,3],[1,2,3],[1,2,3]], "masks": [[-100,2,3],[-100,2,3],[-100,2,3]],
            "scores": [1.0,0.0,0.5], "advantages": [[9,8,7],[6,5,4],[3,2,1]],
            "overrides": [null, {"set_advantage_to_zero": true}, {}],
            "inference_logprobs": [[1,-1,-1],[1,-1,-1],[1,-1,-1]]
        }))
        .expect("group");
        let seqs = align_group(&g);
        assert_eq!(seqs[0].advantages, vec![8.0, 7.0]);
        assert_eq!(seqs[1].advantages, vec![0.0, 0.0]);
        let batch = pack(seqs, 2);
        assert_eq!(
            batch.micro_batches.iter().map(|m| m.rows).collect::<Vec<_>>(),
            vec![2, 1]
        );
    }

    fn batch_of(shapes: &[(usize, usize)]) -> TrainBatch {
        let micro_batches = shapes
            .iter()
            .map(|&(rows, seq_len)| MicroBatch {
                rows,
                seq_len,
                input_ids: vec![0; rows * seq_len],
                labels: vec![IGNORE; rows * seq_len],
                ref_logprobs: vec![1.0; rows * seq_len],
                on_policy: vec![true; rows],
                advantages: vec![0.0; rows * seq_len],
                temperatures: vec![1.0; rows],
                seq_lens: Vec::new(),
                seq_parents: Vec::new(),
                seq_offsets: Vec::new(),
            })
            .collect();
        TrainBatch {
            micro_batches,
            sequences: 0,
            scored_tokens: 0,
            score_sum: 0.0,
        }
    }

    /// Every micro-batch goes to exactly one rank, loads stay balanced, and each share keeps
    /// batch order; more ranks than micro-batches leaves some ranks without work.
    #[test]
    fn micro_batches_are_shared_once_and_balanced() {
        let batch = batch_of(&[(4, 64), (4, 128), (4, 64), (2, 64), (4, 192), (1, 64)]);
        for ranks in 1..=8 {
            let shares = share_micro_batches(&batch, ranks);
            assert_eq!(shares.len(), ranks);
            let mut all: Vec<usize> = shares.concat();
            all.sort_unstable();
            assert_eq!(all, (0..6).collect::<Vec<_>>(), "ranks {ranks}");
            for share in &shares {
                assert!(share.windows(2).all(|w| w[0] < w[1]), "{share:?}");
            }
        }
        let shares = share_micro_batches(&batch, 2);
        let load = |s: &Vec<usize>| {
            s.iter()
                .map(|&i| batch.micro_batches[i].rows * batch.micro_batches[i].seq_len)
                .sum::<usize>()
        };
        let (a, b) = (load(&shares[0]), load(&shares[1]));
        assert!(a.abs_diff(b) <= 256, "{a} vs {b}");
        assert_eq!(
            share_micro_batches(&batch_of(&[(1, 64)]), 3),
            vec![vec![0], vec![], vec![]]
        );
    }

    /// A batch survives the trip to the other ranks bit for bit.
    #[test]
    fn a_batch_round_trips_through_json() {
        let mut batch = batch_of(&[(2, 64)]);
        batch.micro_batches[0].ref_logprobs[3] = -0.123_456_79;
        batch.micro_batches[0].advantages[5] = 1.0e-30;
        batch.score_sum = 0.1 + 0.2;
        let bytes = serde_json::to_vec(&batch).unwrap();
        assert_eq!(serde_json::from_slice::<TrainBatch>(&bytes).unwrap(), batch);
    }

    /// Every sequence is placed once, no micro-batch passes the budget unless it holds one
    /// sequence longer than the budget, and that sequence is alone.
    #[test]
    fn token_budget_plan_places_everything_once_within_budget() {
        let cases: Vec<(Vec<usize>, usize)> = vec![
            (vec![5, 9, 3, 7, 1, 8, 2, 2, 6], 10),
            (vec![40, 3, 3, 60, 1], 32),
            (vec![16; 9], 16),
            (vec![], 8),
            ((1..200).map(|i| (i * 37) % 97 + 1).collect(), 256),
        ];
        for (lens, budget) in cases {
            let plan = plan_token_budget(&lens, budget);
            let mut all: Vec<usize> = plan.concat();
            all.sort_unstable();
            assert_eq!(all, (0..lens.len()).collect::<Vec<_>>(), "{lens:?}");
            for members in &plan {
                let used: usize = members.iter().map(|&i| lens[i]).sum();
                assert!(
                    used <= budget || (members.len() == 1 && lens[members[0]] > budget),
                    "{members:?} uses {used} of {budget}"
                );
            }
            // First-fit decreasing on these inputs needs at most one bin more than the bound.
            let bound = lens.iter().sum::<usize>().div_ceil(budget.max(1));
            let oversized = lens.iter().filter(|&&l| l > budget).count();
            assert!(
                plan.len() <= bound + oversized + 1,
                "{} bins, bound {bound}",
                plan.len()
            );
        }
    }

    /// Packed micro-batches hold every token of every sequence once, with no padding, and the
    /// per-sequence values in sequence order.
    #[test]
    fn packed_micro_batches_have_no_padding() {
        let seq = |n: usize, t: f32, logprobs: bool| Sequence {
            input_ids: (0..n as i64).collect(),
            labels: (0..n as i64).map(|i| if i == 0 { IGNORE } else { i }).collect(),
            ref_logprobs: logprobs.then(|| vec![-0.5; n]),
            advantages: vec![t; n],
            temperature: t,
            score: 1.0,
        };
        let seqs = vec![
            seq(5, 0.5, true),
            seq(9, 0.7, false),
            seq(3, 0.9, true),
            seq(12, 1.0, true),
        ];
        let batch = pack_tokens(seqs, 16);
        assert_eq!(batch.sequences, 4);
        assert_eq!(batch.scored_tokens, 4 + 8 + 2 + 11);
        let tokens: usize = batch.micro_batches.iter().map(|m| m.seq_len).sum();
        assert_eq!(tokens, 5 + 9 + 3 + 12);
        for mb in &batch.micro_batches {
            assert!(mb.is_packed() && mb.rows == 1 && mb.seq_len <= 16);
            assert_eq!(mb.seq_lens.iter().sum::<usize>(), mb.seq_len);
            assert_eq!(mb.input_ids.len(), mb.seq_len);
            assert_eq!(mb.on_policy.len(), mb.seq_lens.len());
            assert_eq!(mb.temperatures.len(), mb.seq_lens.len());
            let mut at = 0;
            for (k, &n) in mb.seq_lens.iter().enumerate() {
                assert_eq!(mb.input_ids[at], 0, "each sequence starts where the last ended");
                assert!(mb.advantages[at..at + n].iter().all(|&a| a == mb.temperatures[k]));
                assert_eq!(mb.on_policy[k], mb.temperatures[k] == 0.7);
                at += n;
            }
        }
    }
}
