//! A client's training memory: estimated from shapes (what the server compares with the
//! budget a client declares before it sends a task) and measured while the client trains
//! (the peak resident set size, where the operating system tells it).

use crate::error::{Error, Result};
use crate::model::CausalLm;

/// Training memory of one client in bytes, counted from shapes: the model's weights
/// ([`CausalLm::weight_bytes`]: `f32` parameters, quantised blocks as stored); in `f32`, a
/// gradient and two AdamW moments for each of the `trainable` adapter values;
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
    model.weight_bytes() + 4 * (3 * trainable as u64 + activations)
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

/// Memory budgets from a comma-separated list, in client order: each entry a size in bytes
/// with an optional `K`, `M` or `G` (powers of 1024; `640M`, `1.5G`, `1048576`), or `none` for
/// no limit. One entry applies to every client; an empty list means no limits.
///
/// ```
/// use devft::federated::parse_memory_budgets;
///
/// let budgets = parse_memory_budgets("640M, none, 1.5G", 3)?;
/// assert_eq!(budgets, vec![Some(640 << 20), None, Some(3 << 29)]);
/// assert_eq!(parse_memory_budgets("2G", 2)?, vec![Some(2 << 30); 2]);
/// assert_eq!(parse_memory_budgets("", 2)?, vec![None; 2]);
/// assert!(parse_memory_budgets("640M,640M", 3).is_err());
/// # Ok::<(), devft::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an entry that is not a positive size, an unknown unit, or a
/// count of entries other than 1 or `clients`.
pub fn parse_memory_budgets(list: &str, clients: usize) -> Result<Vec<Option<u64>>> {
    let budgets = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(parse_memory_size)
        .collect::<Result<Vec<_>>>()?;
    match budgets.len() {
        0 => Ok(vec![None; clients]),
        1 => Ok(vec![budgets[0]; clients]),
        n if n == clients => Ok(budgets),
        n => Err(Error::InvalidArgument(format!(
            "{n} memory budgets for {clients} clients (give 1 or {clients})"
        ))),
    }
}

/// One entry of [`parse_memory_budgets`].
fn parse_memory_size(entry: &str) -> Result<Option<u64>> {
    if entry.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let invalid = || {
        Error::InvalidArgument(format!(
            "memory budget `{entry}` is not a size like 640M, 2G or none"
        ))
    };
    let (digits, shift) = match entry.char_indices().last() {
        Some((i, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(invalid()),
            };
            (&entry[..i], shift)
        }
        _ => (entry, 0),
    };
    let number: f64 = digits.trim().parse().map_err(|_| invalid())?;
    let bytes = number * f64::from(1u32 << shift);
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(invalid());
    }
    Ok(Some(bytes as u64))
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
