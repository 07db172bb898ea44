//! An opt-in setting of the C allocator for processes that train on the CPU.

/// Asks glibc's `malloc` to serve every block from its heaps, never from a mapping of its own,
/// and to keep freed heap memory for reuse instead of returning it to the kernel
/// (`M_MMAP_MAX = 0` and `M_TRIM_THRESHOLD`, settings `GLIBC_TUNABLES` also reaches).
///
/// A training step on burn's CPU backends allocates and frees its temporaries (activations,
/// gradients, logits of 100 MB and more) afresh every step. With glibc's defaults many of them go
/// back to the kernel when freed and come back as fresh pages the kernel must fault in and
/// zero. On SmolLM2-135M's shape keeping blocks of up to 32 MiB in the heap made the forward
/// pass 1.14x faster (`docs/performance.md`, lever 7), and keeping the larger ones (the logits)
/// too took page faults out of the forward (lever 12). The price: the process keeps the
/// memory of its peak step resident between steps instead of returning part of it.
///
/// Process-wide and permanent, so devft never calls it by itself: its examples and benchmarks
/// do, and an application that trains on the CPU may. Returns `false`, changing nothing,
/// where the C library is not glibc.
///
/// ```
/// // At the start of a training program's `main`.
/// let tuned = devft::allocator::retain_freed_memory();
/// assert_eq!(tuned, cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
