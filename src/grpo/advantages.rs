//! Group-relative advantages and per-sequence sampling temperatures, as the Atropos example
//! trainer computes them.

use serde_json::{Map, Value};

use crate::atropos::ScoredGroup;

/// Floor of the population std that normalises a group.
pub const STD_FLOOR: f64 = 1e-8;

/// Per-sequence advantages: `(s - mean) / max(std_pop, 1e-8)` for groups of two or more,
/// the raw score for a single sequence, and 0 where `overrides[i].set_advantage_to_zero`.
pub fn sequence_advantages(group: &ScoredGroup) -> Vec<f64> {
    let s = &group.scores;
    let mut adv: Vec<f64> = if s.len() > 1 {
        let n = s.len() as f64;
        let mean = s.iter().sum::<f64>() / n;
        let std = (s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
        s.iter().map(|x| (x - mean) / std.max(STD_FLOOR)).collect()
    } else {
        s.clone()
    };
    for (i, a) in adv.iter_mut().enumerate() {
        if zeroed(group, i) {
            *a = 0.0;
        }
    }
    adv
}

/// Whether sequence `i` has `set_advantage_to_zero`.
pub fn zeroed(group: &ScoredGroup, i: usize) -> bool {
    group
        .override_of(i)
        .and_then(|o| o.get("set_advantage_to_zero"))
        .is_some_and(truthy)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn temperature_in(map: Option<&Map<String, Value>>) -> Option<f64> {
    map?.get("temperature")?.as_f64()
}

/// Sampling temperature of sequence `i`: per-sequence override > `generation_params` >
/// `group_overrides` > 1.0; a non-positive value means 1.0.
pub fn temperature(group: &ScoredGroup, i: usize) -> f64 {
    let t = temperature_in(group.override_of(i))
        .or_else(|| temperature_in(group.generation_params.as_ref()))
        .or_else(|| temperature_in(group.group_overrides.as_ref()))
        .unwrap_or(1.0);
    if t <= 0.0 {
        1.0
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn group(v: serde_json::Value) -> ScoredGroup {
        serde_json::from_value(v).expect("group")
    }

    #[test]
    fn normalises_with_population_std() {
        let g = group(json!({"tokens":[[1],[1],[1]],"masks":[[1],[1],[1]],"scores":[1.0,0.0,0.0]}));
        let adv = sequence_advantages(&g);
        let expected = [std::f64::consts::SQRT_2, -0.5f64.sqrt(), -0.5f64.sqrt()];
        for (a, e) in adv.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{adv:?}");
        }
    }

    #[test]
    fn single_sequence_keeps_raw_score_and_equal_scores_give_zero() {
        let g = group(json!({"tokens":[[1]],"masks":[[1]],"scores":[0.7]}));
        assert_eq!(sequence_advantages(&g), vec![0.7]);
        let g = group(json!({"tokens":[[1],[1]],"masks":[[1],[1]],"scores":[2.0,2.0]}));
        assert_eq!(sequence_advantages(&g), vec![0.0, 0.0]);
    }

    #[test]
    fn zero_override_and_temperature_priority() {
        let g = group(json!({"tokens":[[1],[1]],"masks":[[1],[1]],"scores":[1.0,-1.0],
            "overrides":[{"set_advantage_to_zero":true,"temperature":0.5},{}],
            "generation_params":{"temperature":0.7},"group_overrides":{"temperature":0.9}}));
        assert_eq!(sequence_advantages(&g), vec![0.0, -1.0]);
        assert_eq!(temperature(&g, 0), 0.5);
        assert_eq!(temperature(&g, 1), 0.7);
        let g = group(json!({"tokens":[[1]],"masks":[[1]],"scores":[1.0],"group_overrides":{"temperature":0.9}}));
        assert_eq!(temperature(&g, 0), 0.9);
        let g = group(json!({"tokens":[[1]],"masks":[[1]],"scores":[1.0],"generation_params":{"temperature":0.0}}));
        assert_eq!(temperature(&g, 0), 1.0);
    }
}
