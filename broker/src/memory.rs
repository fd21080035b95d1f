//! Giving memory back: a farm's sessions come and go by the hundred, and
//! glibc's allocator keeps what they freed unless asked to return it. A
//! second after sessions end (once, however many ended), the broker asks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static PENDING: AtomicBool = AtomicBool::new(false);

/// Returns freed memory to the system a moment from now (at most one
/// pending at a time; needs a tokio runtime).
pub fn release_soon() {
    if PENDING.swap(true, Ordering::Relaxed) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        PENDING.store(false, Ordering::Relaxed);
        // A trim walks the allocator's arenas: not on a relay's thread.
        let _ = tokio::task::spawn_blocking(release).await;
    });
}

/// Returns freed memory to the system now.
pub fn release() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
