//! An opt-in setting of the C allocator for processes that train on the CPU.

/// The largest block glibc's `malloc` serves from its heaps after
/// [`retain_freed_memory`] (its own ceiling for the setting on 64-bit systems).
pub const HEAP_BLOCK_LIMIT: usize = 32 << 20;

/// Asks glibc's `malloc` to serve blocks of up to [`HEAP_BLOCK_LIMIT`] from its heaps and to
/// keep freed heap memory for reuse instead of returning it to the kernel
/// (`M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD`, the settings `GLIBC_TUNABLES` also reaches).
///
/// A training step on burn's CPU backends allocates and frees its temporaries (activations and
/// gradients, megabytes each) afresh every step. With glibc's defaults many of them go back to
/// the kernel when freed and come back as fresh pages the kernel must fault in and zero. On
/// SmolLM2-135M's shape this setting made the forward pass 1.14x faster and left the LoRA
/// training step's time within noise (`docs/performance.md`, lever 7). The price: the process
/// keeps the memory of its peak step resident between steps instead of returning part of it.
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
            libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
