//! Leaf types every side of the weight bridge shares: the policy version, the size of a
//! manifest shape, and the digest of a version's weights. Nothing here imports another module of the crate.

use tch::{Device, Kind, Tensor};
use xxhash_rust::xxh3::Xxh3;

/// The weights an engine serves, by version: the optimizer step that produced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyVersion(pub u64);

/// xxh3-128 of a weight stream (tensors in manifest order, fp32 little-endian, concatenated),
/// shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub u128);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A digest that is not 32 hex digits.
#[derive(Debug, Clone, thiserror::Error)]
#[error("digest {text:?} is not hex: {reason}")]
pub struct BadDigest {
    pub text: String,
    pub reason: String,
}

impl std::str::FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        u128::from_str_radix(s, 16).map(Digest).map_err(|e| BadDigest {
            text: s.into(),
            reason: e.to_string(),
        })
    }
}

/// Elements of a manifest shape, or `None` for a negative dimension or an overflow.
pub fn numel_of(shape: &[i64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
}

/// Digest of raw bytes.
pub fn digest_bytes(bytes: &[u8]) -> Digest {
    let mut h = Xxh3::new();
    h.update(bytes);
    Digest(h.digest128())
}

/// Digest of named tensors, the same as packing them into one fp32 stream and hashing it,
/// without holding the stream.
pub fn digest_tensors(tensors: &[(String, Tensor)]) -> Result<Digest, tch::TchError> {
    let mut h = Xxh3::new();
    let mut buf = Vec::new();
    for (_, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let n = t.numel();
        buf.resize(n * 4, 0);
        t.f_copy_data_u8(&mut buf, n)?;
        h.update(&buf);
    }
    Ok(Digest(h.digest128()))
}
