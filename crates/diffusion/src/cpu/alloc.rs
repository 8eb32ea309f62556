//! Keeping freed memory in the process, so that fresh op outputs do not page-fault.
//!
//! candle allocates every op's output. glibc's `malloc` serves large blocks (above a threshold
//! that grows to at most 32 MiB) from fresh `mmap`s and gives them back on `free`, and trims the
//! top of the heap when enough of it is free: the next output of the same size then faults in
//! every page again (measured: first touch of 134 MB 82 ms, a second pass 34 ms). One SD1.5
//! UNet forward faults about 0.2 million pages this way (0.6–1.5 s of system time, 4–10 % of its
//! CPU time, measured under load).
//! [`keep_freed_memory`] turns both off, the setting this crate recommends for a process that
//! runs models on the CPU (the benchmark binaries call it first thing). Peak memory stays the same
//! (the freed blocks are reused for the next outputs), but the process no longer hands memory
//! back to the system between forwards.

/// Makes glibc's `malloc` serve every block from its heap and never trim it (`mallopt`
/// `M_MMAP_MAX = 0`, `M_TRIM_THRESHOLD = max`). Call it before loading models; it affects the
/// whole process. Returns whether the setting was applied: false on other C libraries (where it
/// does nothing) and when the environment sets `EASYPHOTO_KEEP_FREED_MEMORY=0` (for comparisons).
pub fn keep_freed_memory() -> bool {
    if std::env::var_os("EASYPHOTO_KEEP_FREED_MEMORY").is_some_and(|v| v == "0") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator parameters; both are valid for glibc.
        unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
