//! Leaf: comparing a presented secret with the configured one in constant time (used by the
//! gRPC interceptor and by HTTP listeners that require the token).

/// Whether `a == b`, in time that depends on their lengths only (not on where they differ),
/// so a wrong token's timing tells nothing about the right one.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    let len = a.len() == b.len();
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Both results are combined without a branch on either.
    std::hint::black_box(len) & (std::hint::black_box(diff) == 0)
}

/// Whether an HTTP `authorization` header value carries `Bearer <token>`.
pub fn bearer_matches(header: Option<&[u8]>, token: &str) -> bool {
    let expected = format!("Bearer {token}");
    header.is_some_and(|got| same(got, expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"Bearer abc", b"Bearer abc"));
        assert!(!same(b"Bearer abd", b"Bearer abc"));
        assert!(!same(b"Bearer ab", b"Bearer abc"), "a prefix is not the token");
        assert!(!same(b"Bearer abcd", b"Bearer abc"));
        assert!(bearer_matches(Some(b"Bearer abc"), "abc"));
        assert!(!bearer_matches(Some(b"abc"), "abc"));
        assert!(!bearer_matches(None, "abc"));
    }
}
