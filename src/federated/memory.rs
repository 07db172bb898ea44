//! A client's training memory: estimated from shapes (what the server compares with the
//! budget a client declares before it sends a task) and measured while the client trains
//! (the peak resident set size, where the operating system tells it).

use burn::module::Module;

use crate::model::CausalLm;

/// Training memory of one client in bytes of `f32`, counted from shapes: the model's
/// parameters; a gradient and two AdamW moments for each of the `trainable` adapter values;
/// and the activations of one batch of `batch_tokens` tokens (12 hidden-sized values per
/// token and layer) with `batch_targets` target positions (their logits, twice: values and
/// gradient).
///
/// It is an estimate for comparing stages and budgets, not a bound: allocator slack, the
/// tokenizer and the rest of the process come on top ([`measure_peak_rss`] measures).
///
/// ```
/// use devft::federated::training_memory_estimate;
/// use devft::model::{CausalLm, LoraConfig};
///
/// let device = devft::device::default_device()?;
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
/// let model = CausalLm::load(dir, &device)?.with_lora(&LoraConfig::new(4, 8.0), 0)?;
/// let trainable = model.lora_params().num_values();
/// let short = training_memory_estimate(&model, trainable, 64, 16);
/// let long = training_memory_estimate(&model, trainable, 512, 128);
/// assert!(short < long);
/// # Ok::<(), devft::Error>(())
/// ```
pub fn training_memory_estimate(
    model: &CausalLm,
    trainable: usize,
    batch_tokens: usize,
    batch_targets: usize,
) -> u64 {
    let config = model.config();
    let activations =
        batch_tokens as u64 * 12 * config.hidden_size as u64 * model.num_layers() as u64
            + batch_targets as u64 * 2 * config.vocab_size as u64;
    4 * (model.num_params() as u64 + 3 * trainable as u64 + activations)
}

/// Runs `work` and returns its result with the peak resident set size of this process while
/// it ran, in bytes: Linux's high-water mark (`VmHWM`), reset before `work` starts through
/// `/proc/self/clear_refs`. `None` where the peak cannot be reset and read (other operating
/// systems, a restricted `/proc`).
///
/// The figure is the whole process's: in a deployment where each client is its own process
/// (a Flower SuperNode) it is the client's; where clients share a process, it includes
/// whatever else the process holds. Resetting the high-water mark also resets it for any
/// other reader in the process: measurements running at the same time on several threads
/// (clients trained in parallel in one process) reset each other's, so each then reads at
/// least what was resident at the last reset, not always its own peak.
///
/// ```
/// let (sum, peak) = devft::federated::measure_peak_rss(|| vec![1u8; 1 << 24].iter().map(|&b| b as u64).sum::<u64>());
/// assert_eq!(sum, 1 << 24);
/// if let Some(peak) = peak {
///     assert!(peak >= 1 << 24);
/// }
/// ```
pub fn measure_peak_rss<T>(work: impl FnOnce() -> T) -> (T, Option<u64>) {
    let reset = reset_peak_rss();
    let result = work();
    let peak = if reset { peak_rss() } else { None };
    (result, peak)
}

#[cfg(target_os = "linux")]
fn reset_peak_rss() -> bool {
    // "5" resets the peak resident set size (proc(5), since Linux 4.0).
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(not(target_os = "linux"))]
fn reset_peak_rss() -> bool {
    false
}

#[cfg(target_os = "linux")]
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(not(target_os = "linux"))]
fn peak_rss() -> Option<u64> {
    None
}
