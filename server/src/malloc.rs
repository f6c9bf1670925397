//! glibc's malloc, set for a teacher's tensors.
//!
//! Every op of a CPU forward allocates its output, many of them megabytes (the
//! attention scores of a tile, the MLP activations), and frees it an op later.
//! glibc serves each allocation above its mmap threshold with a fresh `mmap`
//! and returns it with `munmap` when freed, so every such tensor costs page
//! faults and zeroing of fresh pages, again for the next op. Measured on a
//! 4 × 1024-token SmolLM2 forward (2 threads, AMD EPYC): about a quarter of the
//! CPU time in the kernel's page-fault, page-clearing and unmapping paths, and
//! 1.5× the forward's tokens/s with the settings below (README, Performance).
//!
//! [`keep_tensor_memory`] raises the mmap threshold to 32 MiB (glibc's own
//! ceiling for its dynamic threshold) and the trim threshold to 256 MiB, so
//! freed tensor memory is reused instead of returned and faulted in again. The
//! cost is a higher resident set: up to the trim threshold of free heap kept per
//! arena. A user who sets `GLIBC_TUNABLES` with `glibc.malloc.` settings keeps
//! theirs. Other C libraries and platforms: nothing is changed.

/// Sets glibc's mmap and trim thresholds for tensor workloads, once per process.
pub fn keep_tensor_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let user_set =
                std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."));
            if !user_set {
                // SAFETY: mallopt only changes allocator parameters; it is
                // thread-safe and may be called at any time.
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
                }
            }
        }
    });
}
