//! `fork()` children: a child has only the thread that called `fork`, none of the
//! library's threads, so nothing there may use or wait for the threads its parent
//! started. Each `fork()` after [`watch`] counts a generation in the child; what
//! started threads records the generation it started them in.

use std::sync::atomic::{AtomicUsize, Ordering};

static GENERATION: AtomicUsize = AtomicUsize::new(0);

#[cfg(unix)]
extern "C" fn in_new_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    crate::ffi::gate::forget_other_threads();
}

/// Starts counting `fork()`s; called before the library starts a thread.
pub(crate) fn watch() {
    #[cfg(unix)]
    {
        static WATCH: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a child handler that only touches atomics and this
        // thread's own callback depth (async-signal-safe).
        WATCH.call_once(|| unsafe {
            libc::pthread_atfork(None, None, Some(in_new_child));
        });
    }
}

/// The `fork()` generation of this process: 0 in the first one, one more in each
/// child forked after [`watch`].
pub(crate) fn generation() -> usize {
    GENERATION.load(Ordering::Relaxed)
}
