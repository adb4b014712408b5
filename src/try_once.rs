//! A value set once, by whichever caller comes first, whose initialisation may fail
//! (a thread the system refuses): a failure leaves nothing behind, and the next caller
//! tries again. Std's `OnceLock` has no stable fallible form.

use std::sync::{Mutex, OnceLock, PoisonError};

pub(crate) struct TryOnce<T> {
    value: OnceLock<T>,
    /// Held by the caller initialising: one attempt at a time.
    starting: Mutex<()>,
}

impl<T> TryOnce<T> {
    pub(crate) const fn new() -> TryOnce<T> {
        TryOnce {
            value: OnceLock::new(),
            starting: Mutex::new(()),
        }
    }

    /// The value, if set.
    pub(crate) fn get(&self) -> Option<&T> {
        self.value.get()
    }

    /// The value, set by `init` first if it is not yet: `init`'s error is returned
    /// and nothing is kept.
    pub(crate) fn get_or_try_init<E>(&self, init: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        if let Some(value) = self.value.get() {
            return Ok(value);
        }
        let _one = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(value) = self.value.get() {
            return Ok(value);
        }
        let value = init()?;
        Ok(self.value.get_or_init(|| value))
    }
}

#[cfg(test)]
mod tests {
    use super::TryOnce;

    #[test]
    fn a_failed_initialisation_is_not_kept_and_the_next_caller_tries_again() {
        let once: TryOnce<u32> = TryOnce::new();
        assert_eq!(once.get_or_try_init(|| Err("refused")), Err("refused"));
        assert_eq!(once.get(), None);
        assert_eq!(once.get_or_try_init(|| Ok::<_, &str>(7)), Ok(&7));
        assert_eq!(once.get_or_try_init(|| Err("not called")), Ok(&7));
    }
}
