//! Memory the agent no longer uses goes back to the system.
//!
//! The agent uses the system allocator (glibc's malloc on Debian): no extra dependency, and
//! measured fast enough for the proxy (bench/RESULTS.md). Its one weakness here: memory freed
//! after a burst (10,000 connections closing) stays in its arenas, so the resident size
//! stays at the burst's peak. [`give_back`] asks it to return those pages (`malloc_trim`);
//! the connection limits call it once a storm has passed (`http::limits`). Measured with
//! `bench/storm.py`: see bench/RESULTS.md.

/// Returns the allocator's free pages to the system (blocking: call it off the runtime).
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas; it is safe to call at any time.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
