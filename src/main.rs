//! The `ingestd` binary: the command line of the `ingestd` library.

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    ingestd::cli::main()
}

/// One malloc arena for the process, unless `MALLOC_ARENA_MAX` says
/// otherwise. glibc gives threads that allocate at the same time arenas of
/// their own, and each keeps what the events it parsed freed: one arena
/// lowers the benchmark drain's peak memory at the same CPU per event
/// (docs/decisions/0011-cost-per-event.md), as every event's allocations
/// are short-lived and the threads' caches serve them without the lock.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: runs before any other thread exists, and only sets one of
        // the allocator's tunables.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
