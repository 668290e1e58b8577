//! Locks that survive a panicked holder. The data behind the weight bridge's mutexes (a job,
//! the stats, a progress record) is always written whole, so a poisoned lock still guards a
//! consistent value: a panic elsewhere must not make a publication or its record vanish.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, clearing any poison left by a holder that panicked.
pub fn recover<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_still_gives_its_value_and_heals() {
        let m = Arc::new(Mutex::new(7));
        let held = m.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = held.lock().expect("lock");
            panic!("holder dies");
        })
        .join();
        assert!(panicked.is_err() && m.is_poisoned());
        *recover(&m) += 1;
        assert_eq!(*recover(&m), 8);
        assert!(!m.is_poisoned());
    }
}
