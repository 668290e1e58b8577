//! `--train-layer-indices`: "20-31", "0,1,2", "0-3,28-31".

use std::collections::BTreeSet;

/// A validated set of decoder layer indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSet(pub BTreeSet<i64>);

/// Indices at or above this are refused (no model has that many layers; a range up to it is
/// expanded into a set).
pub const MAX_LAYERS: i64 = 1 << 16;

/// A layer list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    #[error("{part:?} in {list:?} is not a layer index")]
    NotAnIndex { part: String, list: String },
    #[error("negative layer index {index} in {list:?}")]
    Negative { index: i64, list: String },
    #[error("range {part:?} starts after it ends")]
    Backwards { part: String },
    #[error("layer index {index} in {list:?}: models have fewer than {MAX_LAYERS} layers")]
    TooLarge { index: i64, list: String },
    #[error("{list:?} names no layers")]
    Empty { list: String },
    #[error("layer {index} does not exist (the model has {num_layers} layers)")]
    Missing { index: i64, num_layers: i64 },
    #[error("no parameter is trainable")]
    NoneTrainable,
}

impl std::str::FromStr for LayerSet {
    type Err = LayerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let parse = |x: &str| {
                x.trim()
                    .parse::<i64>()
                    .map_err(|_| LayerError::NotAnIndex {
                        part: x.to_owned(),
                        list: s.to_owned(),
                    })
                    .and_then(|index| {
                        if index < 0 {
                            Err(LayerError::Negative {
                                index,
                                list: s.to_owned(),
                            })
                        } else {
                            Ok(index)
                        }
                    })
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (parse(a)?, parse(b)?);
                    if a > b {
                        return Err(LayerError::Backwards { part: part.to_owned() });
                    }
                    if b >= MAX_LAYERS {
                        return Err(LayerError::TooLarge {
                            index: b,
                            list: s.to_owned(),
                        });
                    }
                    set.extend(a..=b);
                }
                None => {
                    let v = parse(part)?;
                    if v >= MAX_LAYERS {
                        return Err(LayerError::TooLarge {
                            index: v,
                            list: s.to_owned(),
                        });
                    }
                    set.insert(v);
                }
            }
        }
        if set.is_empty() {
            return Err(LayerError::Empty { list: s.to_owned() });
        }
        Ok(Self(set))
    }
}

impl LayerSet {
    /// Fails if an index is not below `num_layers`.
    pub fn check(&self, num_layers: i64) -> Result<(), LayerError> {
        match self.0.iter().find(|&&i| i >= num_layers) {
            Some(&index) => Err(LayerError::Missing { index, num_layers }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_rejects_nonsense() {
        let set: LayerSet = "0-3,28-31, 2".parse().expect("valid");
        assert_eq!(
            set.0.iter().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 28, 29, 30, 31]
        );
        for bad in ["", "3-1", "-1", "a", "1-b"] {
            assert!(bad.parse::<LayerSet>().is_err(), "{bad:?} must be rejected");
        }
        assert!(set.check(32).is_ok());
        assert!(set.check(30).is_err());
    }
}
