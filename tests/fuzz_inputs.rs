//! Deterministic, fixed-budget mutation fuzzing of every decoder of untrusted input.
//!
//! Each test builds a valid seed input, checks that the seed decodes, then feeds mutated
//! copies of it to the decoder, which must return `Ok` or an `Err(devft::Error)`. A panic fails
//! the case (it is caught and reported with the input), a hang fails it after a time limit
//! (checkpoint resume), and an abort (an allocation the process cannot make) kills the test
//! binary, which fails `cargo test` too. Where a mutation is bound to break the input (a strict
//! prefix of a file whose length is declared inside it, a required size set to zero or to a
//! non-integer, a changed tensor header entry, a changed run seed) the test also asserts the
//! `Err`; where it cannot (only tensor data bytes changed in place) it asserts the `Ok`.
//!
//! | test                | decoder                                                      | cases  | time  |
//! |---------------------|--------------------------------------------------------------|--------|-------|
//! | `gguf_reader`       | `GgufFile::open`, `decoder_config`, `tensor`, `Tokenizer::from_gguf`, `CausalLm::from_gguf`, `generate_greedy` | 2048 | 8 s |
//! | `safetensors_bytes` | `ParamMap::from_safetensors_bytes` (an f32 map; an f16/bf16 map) | 2 x 2048 | 5 s |
//! | `model_safetensors` | `CausalLm::load`: fixture `config.json`, mutated `model.safetensors` | 512 | 3 s |
//! | `model_config_json` | `HfConfig::load`, `resolve`, then `CausalLm::load` with the fixture weights | 2048 | 8 s |
//! | `peft_adapter`      | `import_adapter`: mutated `adapter_config.json` and/or `adapter_model.safetensors` | 1024 | 5 s |
//! | `protocol_messages` | `TrainReply`, `TrainTask`, `StageSetup` decoding under a byte limit | 4096 | 4 s |
//! | `checkpoint_resume` | `FederatedRun::run` resuming a mutated checkpoint, 60 s deadline | 256 | 22 s |
//!
//! Mutations: bit flips; bytes set to 0x00, 0xFF, 0x7F, 0x80 or any value; truncation;
//! duplication and removal of a chunk; aligned 4- and 8-byte words overwritten with 0, 1, 2,
//! 2^31 - 1, 2^31, u32::MAX, 2^32, 2^62, i64::MAX, u64::MAX. Three quarters of the positions
//! fall in the header of the seed (metadata and tensor index of a GGUF file, the JSON header of a
//! safetensors file), where the lengths live; positions past a truncation wrap around. On top of
//! the byte mutations each decoder gets structured ones: every count, length, type and
//! dimension field of the GGUF file overwritten by name; safetensors header entries edited
//! (shape, data offsets, dtype, name, `__metadata__`, tensors dropped); JSON fields of
//! `config.json`, `adapter_config.json` and a checkpoint's `state.json` replaced with 0, 1,
//! huge (1e9, 2^31 - 1, 2^32, 2^62, u64::MAX, numbers beyond u64 or f64), negative, float,
//! string, null, array and object values, or removed.
//!
//! Budget: the cases and their shrinking are seeded from the test name, so every run draws the
//! same inputs. Times above are for `cargo test --test fuzz_inputs -- --test-threads=2` on a
//! two-core machine (about 30 s for the file); each test prints its case count, time and what
//! its cases reached (`open ok: 460, model ok: 226, ...`) to stderr, shown with `--nocapture`.
//!
//! Longer sessions: `DEVFT_FUZZ_CASES=N` multiplies every case count by `N`, `DEVFT_FUZZ_SEED=S`
//! draws a different, still reproducible, sample, and `DEVFT_FUZZ_VERBOSE=1` prints every case
//! and every error returned:
//!
//! ```text
//! DEVFT_FUZZ_CASES=20 DEVFT_FUZZ_SEED=1 cargo test --test fuzz_inputs -- --nocapture
//! ```
//!
//! A failing case is shrunk and reported by proptest with its input. An abort leaves no such
//! report (and libtest drops the captured output), so the case in progress is kept in
//! `$TMPDIR/devft-fuzz-<test>.case` (e.g. `/tmp/devft-fuzz-config-json.case`) until the test
//! ends. Run a test alone (`--exact gguf_reader`) to tell which one aborted.
//!
//! Stay in the test profile (not `--release`): the crate is built with overflow checks there,
//! so an unchecked size computation panics here instead of wrapping silently.

mod common;

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::*;
use devft::aggregate::ClientInstructions;
use devft::aggregate::FedAvg;
use devft::federated::protocol::{
    MergeSync, MergedStage, Message, StageSetup, StartAdapter, TrainReply, TrainTask,
};
use devft::federated::{
    FederatedConfig, FederatedRun, LocalTrainingConfig, Strategy as RunStrategy,
};
use devft::fusion::DifferentialFuser;
use devft::grouping::Grouping;
use devft::grouping::SpectralGrouper;
use devft::model::gguf::GgufFile;
use devft::model::{CausalLm, DecoderConfig, HfConfig, LoraConfig, import_adapter};
use devft::schedule::{ExplicitScheduler, Stage};
use devft::tokenizer::Tokenizer;
use devft::{Error, HostTensor, ParamMap};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Budget, runner and panic capture
// ---------------------------------------------------------------------------------------------

/// `DEVFT_FUZZ_CASES`: the factor every case count is multiplied by (1, the CI budget, unless
/// set).
fn case_multiplier() -> u32 {
    std::env::var("DEVFT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|&m| m > 0)
        .unwrap_or(1)
}

/// `DEVFT_FUZZ_SEED`: mixed into every test's fixed seed (0 unless set).
fn seed_offset() -> u64 {
    std::env::var("DEVFT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Runs `test` on `cases` inputs drawn from `strategy` with a seed fixed by `name`, without
/// failure persistence; a failing input is shrunk for at most `shrink_iters` runs (0: none).
fn fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    shrink_iters: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    // FNV-1a of the name, so that each test draws its own sequence.
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let seed = name_hash ^ seed_offset();
    let cases = cases.saturating_mul(case_multiplier());
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: shrink_iters,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    // An abort (a failed allocation) ends the process before proptest can name the input, and
    // takes libtest's captured output with it: keep the case in progress in a file, and with
    // `DEVFT_FUZZ_VERBOSE` write it to the real stderr, which libtest does not capture.
    let file_name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let record = std::env::temp_dir().join(format!("devft-fuzz-{file_name}.case"));
    let verbose = std::env::var_os("DEVFT_FUZZ_VERBOSE").is_some();
    let started = Instant::now();
    let result = TestRunner::new(config).run(&strategy, |value| {
        let text = format!("fuzz {name} (rng seed {seed}), case in progress:\n{value:#?}\n");
        let _ = std::fs::write(&record, &text);
        if verbose {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
        }
        test(value)
    });
    let _ = std::fs::remove_file(&record);
    eprintln!(
        "fuzz {name}: {cases} cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz {name} (rng seed {seed}): {e}");
    }
}

/// Counts of what the cases reached, printed after a test to show its coverage.
#[derive(Default)]
struct Tally(std::sync::Mutex<std::collections::BTreeMap<String, usize>>);

impl Tally {
    fn hit(&self, what: impl Into<String>) {
        *self.0.lock().unwrap().entry(what.into()).or_default() += 1;
    }

    /// Counts `result` as `<what> ok` or `<what> err`; with `DEVFT_FUZZ_VERBOSE` set, prints
    /// each error.
    fn outcome<T, E: std::fmt::Display>(&self, what: &str, result: &Result<T, E>) {
        self.hit(format!(
            "{what} {}",
            if result.is_ok() { "ok" } else { "err" }
        ));
        if let Err(e) = result
            && std::env::var_os("DEVFT_FUZZ_VERBOSE").is_some()
        {
            eprintln!("  {what}: {e}");
        }
    }

    fn report(&self, name: &str) {
        let counts = self.0.lock().unwrap();
        let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        eprintln!("fuzz {name}: {}", line.join(", "));
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<a panic without a message>".into())
}

/// Runs `f`, turning a panic into a failed case that names `what`.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| TestCaseError::fail(format!("{what} panicked: {}", panic_message(&*p))))
}

fn is_strict_prefix(bytes: &[u8], of: &[u8]) -> bool {
    bytes.len() < of.len() && of.starts_with(bytes)
}

/// Whether `bytes` has the length of `seed` and differs from it only at or after `from`.
fn changed_only_after(bytes: &[u8], seed: &[u8], from: usize) -> bool {
    bytes.len() == seed.len() && bytes[..from.min(bytes.len())] == seed[..from.min(seed.len())]
}

// ---------------------------------------------------------------------------------------------
// Byte mutations
// ---------------------------------------------------------------------------------------------

/// One byte-level mutation. Positions are drawn below the seed's length and wrap around the
/// current length (after a truncation).
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Truncate {
        len: usize,
    },
    Duplicate {
        from: usize,
        len: usize,
        to: usize,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// Overwrites the little-endian `width`-byte word at `at` rounded down to a multiple of
    /// `width`.
    Word {
        at: usize,
        width: usize,
        value: u64,
    },
}

const INTERESTING_BYTES: [u8; 4] = [0x00, 0xFF, 0x7F, 0x80];

const INTERESTING_INTS: [u64; 10] = [
    0,
    1,
    2,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// A position below `len`, three times in four below `hot` (the seed's header).
fn position(len: usize, hot: usize) -> BoxedStrategy<usize> {
    let len = len.max(1);
    let hot = hot.clamp(1, len);
    prop_oneof![3 => 0..hot, 1 => 0..len].boxed()
}

fn mutation(len: usize, hot: usize) -> BoxedStrategy<Mutation> {
    let pos = move || position(len, hot);
    let byte = prop_oneof![select(INTERESTING_BYTES.to_vec()), any::<u8>()];
    prop_oneof![
        2 => (pos(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (pos(), byte).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        1 => pos().prop_map(|len| Mutation::Truncate { len }),
        1 => (pos(), 1usize..64, pos())
            .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        1 => (pos(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        3 => (pos(), select(vec![4usize, 8]), select(INTERESTING_INTS.to_vec()))
            .prop_map(|(at, width, value)| Mutation::Word { at, width, value }),
    ]
    .boxed()
}

/// One to three mutations of a `len`-byte seed whose first `hot` bytes are its header.
fn mutations(len: usize, hot: usize) -> BoxedStrategy<Vec<Mutation>> {
    vec(mutation(len, hot), 1..=3).boxed()
}

fn apply_mutation(out: &mut Vec<u8>, mutation: &Mutation) {
    let n = out.len();
    if n == 0 {
        return;
    }
    match *mutation {
        Mutation::FlipBit { at, bit } => out[at % n] ^= 1 << bit,
        Mutation::SetByte { at, value } => out[at % n] = value,
        Mutation::Truncate { len } => out.truncate(len),
        Mutation::Duplicate { from, len, to } => {
            let from = from % n;
            let chunk = out[from..(from + len).min(n)].to_vec();
            let to = to % (n + 1);
            out.splice(to..to, chunk);
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            out.drain(at..(at + len).min(n));
        }
        Mutation::Word { at, width, value } => {
            if n >= width {
                let at = ((at % n) / width * width).min(n - width);
                out[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
    }
}

fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for m in mutations {
        apply_mutation(&mut out, m);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Structured JSON values
// ---------------------------------------------------------------------------------------------

/// A JSON value to put in a field: a value, or raw text serde_json's `Value` cannot hold.
#[derive(Clone, Debug)]
enum Jv {
    V(Value),
    Raw(&'static str),
}

impl Jv {
    /// The `u64` this value deserialises to, if any.
    fn as_u64(&self) -> Option<u64> {
        match self {
            Jv::V(v) => v.as_u64(),
            // None of the raw texts below is an integer serde_json reads as a `u64`.
            Jv::Raw(_) => None,
        }
    }

    /// Whether the value leaves an option off (PEFT's neutral values).
    fn is_neutral(&self) -> bool {
        match self {
            Jv::V(Value::Null | Value::Bool(false)) => true,
            Jv::V(Value::Array(items)) => items.is_empty(),
            Jv::V(Value::Object(map)) => map.is_empty(),
            _ => false,
        }
    }
}

/// Numbers beyond `u64` or `f64`, and texts that are not JSON numbers at all.
const RAW_NUMBERS: [&str; 8] = [
    "1e400",
    "-1e400",
    "18446744073709551616",
    "99999999999999999999999999",
    "NaN",
    "Infinity",
    "0x10",
    "01",
];

/// 0, 1, huge, negative, float, null and a few other types.
fn json_number() -> BoxedStrategy<Jv> {
    let values = vec![
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(7),
        json!(1_000_000_000_u64),
        json!(0x7FFF_FFFF_u64),
        json!(0xFFFF_FFFF_u64),
        json!(1_u64 << 32),
        json!(1_u64 << 62),
        json!(u64::MAX),
        json!(-1),
        json!(i64::MIN),
        json!(1.5),
        json!(1e9),
        json!(1e300),
        json!(-0.0),
        json!(f64::MIN_POSITIVE),
        Value::Null,
        json!(true),
        json!("64"),
        json!([]),
        json!({}),
    ];
    prop_oneof![
        6 => select(values).prop_map(Jv::V),
        1 => select(RAW_NUMBERS.to_vec()).prop_map(Jv::Raw),
    ]
    .boxed()
}

/// Half [`json_number`], half plausible sizes: the fixture's own, their neighbours, and large
/// but representable ones.
fn size_value() -> BoxedStrategy<Jv> {
    let sizes = vec![
        0u64, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 32, 64, 128, 176, 256, 1000, 4096, 65_536,
        1_000_000,
    ];
    prop_oneof![
        1 => json_number(),
        1 => select(sizes).prop_map(|v| Jv::V(json!(v))),
    ]
    .boxed()
}

/// Any of [`json_number`] or a string, bool, array or object.
fn json_any() -> BoxedStrategy<Jv> {
    let others = vec![
        json!(""),
        json!("linear"),
        json!("llama3"),
        json!("yarn"),
        json!("qwen2"),
        json!("silu"),
        json!("gelu"),
        json!(false),
        json!([1, 2]),
        json!({"a": 1}),
    ];
    prop_oneof![3 => json_number(), 1 => select(others).prop_map(Jv::V)].boxed()
}

/// An edit of a JSON document; `field` may be a dotted path into nested objects.
#[derive(Clone, Debug)]
enum JsonEdit {
    Set(&'static str, Jv),
    Remove(&'static str),
}

/// The object holding the last component of `path`, created along the way when absent.
fn parent<'a>(root: &'a mut Value, path: &str) -> Option<(&'a mut Map<String, Value>, String)> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop()?.to_string();
    let mut node = root;
    for part in parts {
        let object = node.as_object_mut()?;
        node = object
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    Some((node.as_object_mut()?, last))
}

/// Applies `edits` to `doc` and serialises it with raw values spliced in.
fn edit_json(doc: &Value, edits: &[JsonEdit]) -> (Value, Vec<u8>) {
    let mut doc = doc.clone();
    let mut raws = Vec::new();
    for edit in edits {
        match edit {
            JsonEdit::Set(path, value) => {
                let value = match value {
                    Jv::V(v) => v.clone(),
                    Jv::Raw(raw) => {
                        raws.push(*raw);
                        Value::String(format!("@@raw{}@@", raws.len() - 1))
                    }
                };
                if let Some((object, key)) = parent(&mut doc, path) {
                    object.insert(key, value);
                }
            }
            JsonEdit::Remove(path) => {
                if let Some((object, key)) = parent(&mut doc, path) {
                    object.remove(&key);
                }
            }
        }
    }
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    for (i, raw) in raws.iter().enumerate() {
        text = text.replace(&format!("\"@@raw{i}@@\""), raw);
    }
    (doc, text.into_bytes())
}

/// What `edits` leave at `path`.
#[derive(Debug)]
enum Final<'a> {
    Untouched,
    Removed,
    Set(&'a Jv),
}

fn final_edit<'a>(edits: &'a [JsonEdit], path: &str) -> Final<'a> {
    edits
        .iter()
        .rev()
        .find_map(|e| match e {
            JsonEdit::Set(p, v) if *p == path => Some(Final::Set(v)),
            JsonEdit::Remove(p) if *p == path => Some(Final::Removed),
            _ => None,
        })
        .unwrap_or(Final::Untouched)
}

// ---------------------------------------------------------------------------------------------
// Safetensors header edits
// ---------------------------------------------------------------------------------------------

/// A structured edit of a safetensors header. `tensor` picks an entry by index (wrapping) in
/// the header's sorted tensor names.
#[derive(Clone, Debug)]
enum HeaderEdit {
    Shape {
        tensor: usize,
        dim: usize,
        value: u64,
    },
    AppendDim {
        tensor: usize,
        value: u64,
    },
    ClearShape {
        tensor: usize,
    },
    Offset {
        tensor: usize,
        end: bool,
        value: u64,
    },
    SwapOffsets {
        tensor: usize,
    },
    Dtype {
        tensor: usize,
        dtype: &'static str,
    },
    Rename {
        tensor: usize,
        to: &'static str,
    },
    Drop {
        tensor: usize,
    },
    Entry {
        tensor: usize,
        json: &'static str,
    },
    Metadata {
        json: &'static str,
    },
}

const DTYPES: [&str; 12] = [
    "F16", "BF16", "F64", "I32", "U32", "I8", "U8", "BOOL", "F8_E4M3", "I64", "f32", "XYZ",
];

const TENSOR_NAMES: [&str; 10] = [
    "",
    "__metadata__",
    "x",
    "model.layers.99.mlp.up_proj.weight",
    "model.layers.07.self_attn.q_proj.weight",
    "model.layers.18446744073709551616.input_layernorm.weight",
    "model.norm.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A",
];

const ENTRIES: [&str; 12] = [
    "null",
    "[]",
    "{}",
    "1",
    r#""x""#,
    r#"{"dtype":"F32","shape":[],"data_offsets":[0,0]}"#,
    r#"{"dtype":"F32","shape":[0],"data_offsets":[0,0]}"#,
    r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#,
    r#"{"dtype":"F32","shape":[1],"data_offsets":[4,0]}"#,
    r#"{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}"#,
    r#"{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}"#,
    r#"{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}"#,
];

const METADATA: [&str; 6] = [
    r#"{"format":"pt"}"#,
    r#"{"format":1}"#,
    "null",
    "[]",
    r#""x""#,
    r#"{"":""}"#,
];

fn header_int() -> BoxedStrategy<u64> {
    prop_oneof![2 => select(INTERESTING_INTS.to_vec()), 1 => 0u64..64, 1 => any::<u64>()].boxed()
}

fn header_edit() -> BoxedStrategy<HeaderEdit> {
    let t = || 0usize..1024;
    prop_oneof![
        3 => (t(), 0usize..4, header_int())
            .prop_map(|(tensor, dim, value)| HeaderEdit::Shape { tensor, dim, value }),
        1 => (t(), header_int()).prop_map(|(tensor, value)| HeaderEdit::AppendDim { tensor, value }),
        1 => t().prop_map(|tensor| HeaderEdit::ClearShape { tensor }),
        3 => (t(), any::<bool>(), header_int())
            .prop_map(|(tensor, end, value)| HeaderEdit::Offset { tensor, end, value }),
        1 => t().prop_map(|tensor| HeaderEdit::SwapOffsets { tensor }),
        2 => (t(), select(DTYPES.to_vec())).prop_map(|(tensor, dtype)| HeaderEdit::Dtype { tensor, dtype }),
        1 => (t(), select(TENSOR_NAMES.to_vec())).prop_map(|(tensor, to)| HeaderEdit::Rename { tensor, to }),
        1 => t().prop_map(|tensor| HeaderEdit::Drop { tensor }),
        1 => (t(), select(ENTRIES.to_vec())).prop_map(|(tensor, json)| HeaderEdit::Entry { tensor, json }),
        1 => select(METADATA.to_vec()).prop_map(|json| HeaderEdit::Metadata { json }),
    ]
    .boxed()
}

/// A valid safetensors buffer split into its header and data section.
struct SafetensorsSeed {
    bytes: Vec<u8>,
    header: Map<String, Value>,
    data_start: usize,
}

impl SafetensorsSeed {
    fn new(bytes: Vec<u8>) -> Self {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).expect("a valid seed header");
        Self {
            bytes,
            header,
            data_start: 8 + n,
        }
    }
}

fn safetensors_with_header(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    out
}

/// The object of tensor `name` in `header`, with its name.
fn entry_mut(
    header: &mut Map<String, Value>,
    name: Option<String>,
) -> Option<(String, &mut Map<String, Value>)> {
    let name = name?;
    let entry = header.get_mut(&name)?.as_object_mut()?;
    Some((name, entry))
}

/// Applies `edits` to a copy of `header`; returns a log of what each did.
fn edit_header(header: &mut Map<String, Value>, edits: &[HeaderEdit]) -> Vec<String> {
    let mut log = Vec::new();
    for edit in edits {
        let names: Vec<String> = header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        let pick = |i: usize| names.get(i % names.len().max(1)).cloned();
        match *edit {
            HeaderEdit::Shape { tensor, dim, value } => {
                if let Some((name, e)) = entry_mut(header, pick(tensor))
                    && let Some(shape) = e.get_mut("shape").and_then(Value::as_array_mut)
                    && !shape.is_empty()
                {
                    let dim = dim % shape.len();
                    shape[dim] = json!(value);
                    log.push(format!("`{name}` shape[{dim}] = {value}"));
                }
            }
            HeaderEdit::AppendDim { tensor, value } => {
                if let Some((name, e)) = entry_mut(header, pick(tensor))
                    && let Some(shape) = e.get_mut("shape").and_then(Value::as_array_mut)
                {
                    shape.push(json!(value));
                    log.push(format!("`{name}` shape += [{value}]"));
                }
            }
            HeaderEdit::ClearShape { tensor } => {
                if let Some((name, e)) = entry_mut(header, pick(tensor)) {
                    e.insert("shape".into(), json!([]));
                    log.push(format!("`{name}` shape = []"));
                }
            }
            HeaderEdit::Offset { tensor, end, value } => {
                if let Some((name, e)) = entry_mut(header, pick(tensor))
                    && let Some(offsets) = e.get_mut("data_offsets").and_then(Value::as_array_mut)
                    && offsets.len() == 2
                {
                    offsets[usize::from(end)] = json!(value);
                    log.push(format!(
                        "`{name}` data_offsets[{}] = {value}",
                        usize::from(end)
                    ));
                }
            }
            HeaderEdit::SwapOffsets { tensor } => {
                if let Some((name, e)) = entry_mut(header, pick(tensor))
                    && let Some(offsets) = e.get_mut("data_offsets").and_then(Value::as_array_mut)
                {
                    offsets.reverse();
                    log.push(format!("`{name}` data_offsets reversed"));
                }
            }
            HeaderEdit::Dtype { tensor, dtype } => {
                if let Some((name, e)) = entry_mut(header, pick(tensor)) {
                    e.insert("dtype".into(), json!(dtype));
                    log.push(format!("`{name}` dtype = {dtype}"));
                }
            }
            HeaderEdit::Rename { tensor, to } => {
                if let Some(name) = pick(tensor)
                    && let Some(value) = header.remove(&name)
                {
                    header.insert(to.to_string(), value);
                    log.push(format!("`{name}` renamed `{to}`"));
                }
            }
            HeaderEdit::Drop { tensor } => {
                if let Some(name) = pick(tensor) {
                    header.remove(&name);
                    log.push(format!("`{name}` dropped"));
                }
            }
            HeaderEdit::Entry { tensor, json } => {
                if let Some(name) = pick(tensor) {
                    header.insert(name.clone(), serde_json::from_str(json).unwrap());
                    log.push(format!("`{name}` = {json}"));
                }
            }
            HeaderEdit::Metadata { json } => {
                header.insert("__metadata__".into(), serde_json::from_str(json).unwrap());
                log.push(format!("__metadata__ = {json}"));
            }
        }
    }
    log
}

/// How one safetensors input is derived from its seed.
#[derive(Clone, Debug)]
enum StCase {
    Bytes(Vec<Mutation>),
    Header(Vec<HeaderEdit>),
    HeaderThenBytes(Vec<HeaderEdit>, Vec<Mutation>),
    /// Keeps only the first `n` tensors (re-encoded).
    Keep(usize),
}

fn st_case(seed: &SafetensorsSeed) -> BoxedStrategy<StCase> {
    let (len, hot) = (seed.bytes.len(), seed.data_start);
    prop_oneof![
        4 => mutations(len, hot).prop_map(StCase::Bytes),
        4 => vec(header_edit(), 1..=3).prop_map(StCase::Header),
        1 => (vec(header_edit(), 1..=2), mutations(len, hot))
            .prop_map(|(h, b)| StCase::HeaderThenBytes(h, b)),
        1 => (0usize..4).prop_map(StCase::Keep),
    ]
    .boxed()
}

/// A safetensors input: its bytes, a log of the header edits, and whether a tensor entry of
/// the header (not `__metadata__`) now differs from the seed's (`None`: unknown, because
/// bytes were mutated).
struct StInput {
    bytes: Vec<u8>,
    log: Vec<String>,
    entries_changed: Option<bool>,
}

fn tensor_entries(header: &Map<String, Value>) -> Vec<(&String, &Value)> {
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .collect()
}

fn build_st(seed: &SafetensorsSeed, case: &StCase) -> StInput {
    let data = &seed.bytes[seed.data_start..];
    let edited = |edits: &[HeaderEdit]| {
        let mut header = seed.header.clone();
        let log = edit_header(&mut header, edits);
        let changed = tensor_entries(&header) != tensor_entries(&seed.header);
        (safetensors_with_header(&header, data), log, changed)
    };
    match case {
        StCase::Bytes(m) => StInput {
            bytes: mutate(&seed.bytes, m),
            log: Vec::new(),
            entries_changed: None,
        },
        StCase::Header(edits) => {
            let (bytes, log, changed) = edited(edits);
            StInput {
                bytes,
                log,
                entries_changed: Some(changed),
            }
        }
        StCase::HeaderThenBytes(edits, m) => {
            let (bytes, log, _) = edited(edits);
            StInput {
                bytes: mutate(&bytes, m),
                log,
                entries_changed: None,
            }
        }
        StCase::Keep(n) => {
            let map = ParamMap::from_safetensors_bytes(&seed.bytes, "seed").unwrap();
            let total = map.len();
            let kept: ParamMap = map.into_iter().take(*n).collect();
            StInput {
                bytes: kept.to_safetensors_bytes().unwrap(),
                log: vec![format!("kept {} of {total} tensors", kept.len())],
                entries_changed: Some(*n < total),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. GGUF
// ---------------------------------------------------------------------------------------------

/// A metadata value to write.
enum Kv {
    U32(u32),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(&'static str),
    Strs(&'static [&'static str]),
    I32s(&'static [i32]),
    /// An array of arrays of `u8`.
    Nested(&'static [&'static [u8]]),
}

/// A numeric field of the written file: what it is, where, and how wide.
#[derive(Clone, Debug)]
struct GgufField {
    /// Read through `Debug`, in the report of a failing input.
    #[allow(dead_code)]
    name: String,
    at: usize,
    width: usize,
}

/// A GGUF writer that records where each count, length, type id, dimension and integer value
/// lies.
#[derive(Default)]
struct GgufWriter {
    out: Vec<u8>,
    fields: Vec<GgufField>,
}

impl GgufWriter {
    fn u32(&mut self, name: impl Into<String>, v: u32) {
        self.fields.push(GgufField {
            name: name.into(),
            at: self.out.len(),
            width: 4,
        });
        self.out.extend(v.to_le_bytes());
    }

    fn u64(&mut self, name: impl Into<String>, v: u64) {
        self.fields.push(GgufField {
            name: name.into(),
            at: self.out.len(),
            width: 8,
        });
        self.out.extend(v.to_le_bytes());
    }

    fn string(&mut self, name: &str, s: &str) {
        self.u64(format!("{name} length"), s.len() as u64);
        self.out.extend(s.as_bytes());
    }

    fn kv(&mut self, key: &str, value: &Kv) {
        self.string(&format!("key `{key}`"), key);
        let at = |what: &str| format!("`{key}` {what}");
        match value {
            Kv::U32(v) => {
                self.u32(at("type"), 4);
                self.u32(at("value"), *v);
            }
            Kv::U64(v) => {
                self.u32(at("type"), 10);
                self.u64(at("value"), *v);
            }
            Kv::F32(v) => {
                self.u32(at("type"), 6);
                self.u32(at("value"), v.to_bits());
            }
            Kv::F64(v) => {
                self.u32(at("type"), 12);
                self.u64(at("value"), v.to_bits());
            }
            Kv::Bool(v) => {
                self.u32(at("type"), 7);
                self.out.push(u8::from(*v));
            }
            Kv::Str(v) => {
                self.u32(at("type"), 8);
                self.string(&at("value"), v);
            }
            Kv::Strs(items) => {
                self.u32(at("type"), 9);
                self.u32(at("item type"), 8);
                self.u64(at("count"), items.len() as u64);
                for (i, s) in items.iter().enumerate() {
                    self.string(&at(&format!("[{i}]")), s);
                }
            }
            Kv::I32s(items) => {
                self.u32(at("type"), 9);
                self.u32(at("item type"), 5);
                self.u64(at("count"), items.len() as u64);
                for (i, v) in items.iter().enumerate() {
                    self.u32(at(&format!("[{i}]")), *v as u32);
                }
            }
            Kv::Nested(items) => {
                self.u32(at("type"), 9);
                self.u32(at("item type"), 9);
                self.u64(at("count"), items.len() as u64);
                for (i, inner) in items.iter().enumerate() {
                    self.u32(at(&format!("[{i}] item type")), 0);
                    self.u64(at(&format!("[{i}] count")), inner.len() as u64);
                    self.out.extend(*inner);
                }
            }
        }
    }
}

/// The GGUF seed: its bytes, where the tensor data starts, and its numeric fields.
struct GgufSeed {
    bytes: Vec<u8>,
    data_start: usize,
    fields: Vec<GgufField>,
}

/// A GGUF v3 file (alignment 32) with `kvs` and tensors `(name, dims innermost first, type id,
/// data)`.
fn write_gguf(kvs: &[(&str, Kv)], tensors: &[(String, Vec<u64>, u32, Vec<u8>)]) -> GgufSeed {
    let mut w = GgufWriter::default();
    w.out.extend(b"GGUF");
    w.u32("version", 3);
    w.u64("tensor count", tensors.len() as u64);
    w.u64("metadata count", kvs.len() as u64 + 2);
    w.kv("general.alignment", &Kv::U32(32));
    w.kv("general.architecture", &Kv::Str("llama"));
    for (key, value) in kvs {
        w.kv(key, value);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, dims, kind, data) in tensors {
        w.string(&format!("tensor `{name}` name"), name);
        w.u32(
            format!("tensor `{name}` dimension count"),
            dims.len() as u32,
        );
        for (i, d) in dims.iter().enumerate() {
            w.u64(format!("tensor `{name}` dim {i}"), *d);
        }
        w.u32(format!("tensor `{name}` type"), *kind);
        w.u64(format!("tensor `{name}` offset"), offset);
        offsets.push(offset);
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while !w.out.len().is_multiple_of(32) {
        w.out.push(0);
    }
    let data_start = w.out.len();
    for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
        w.out.resize(data_start + off as usize, 0);
        w.out.extend(data);
    }
    GgufSeed {
        bytes: w.out,
        data_start,
        fields: w.fields,
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// `values` in GGUF type `kind` (F32 0, F16 1, Q4_0 2, Q4_1 3, Q8_0 8, BF16 30).
fn encode_gguf(kind: u32, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        0 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        1 => out.extend(values.iter().flat_map(|&v| f16_bytes(v))),
        30 => out.extend(
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
        ),
        2 | 3 | 8 => {
            for block in values.chunks(32) {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let quant: Vec<u8> = match kind {
                    8 => {
                        let d = max / 127.0;
                        out.extend(f16_bytes(d));
                        block.iter().map(|v| (v / d).round() as i8 as u8).collect()
                    }
                    2 => {
                        let d = max / 7.0;
                        out.extend(f16_bytes(d));
                        block
                            .iter()
                            .map(|v| ((v / d).round() + 8.0).clamp(0.0, 15.0) as u8)
                            .collect()
                    }
                    _ => {
                        let d = (block.iter().copied().fold(f32::MIN, f32::max) - min) / 15.0;
                        out.extend(f16_bytes(d.max(1e-6)));
                        out.extend(f16_bytes(min));
                        block
                            .iter()
                            .map(|v| ((v - min) / d.max(1e-6)).round().clamp(0.0, 15.0) as u8)
                            .collect()
                    }
                };
                if kind == 8 {
                    out.extend(quant);
                } else {
                    out.extend((0..16).map(|j| quant[j] | (quant[j + 16] << 4)));
                }
            }
        }
        other => panic!("no encoder for GGUF type {other}"),
    }
    out
}

/// transformers name -> (GGUF name, type id).
fn gguf_tensor(hf: &str) -> (String, u32) {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight", 1),
        ("model.norm.weight", "output_norm.weight", 0),
        ("lm_head.weight", "output.weight", 30),
    ];
    if let Some((_, g, kind)) = fixed.iter().find(|(h, _, _)| *h == hf) {
        return (g.to_string(), *kind);
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, inner) = rest.split_once('.').unwrap();
    let map = [
        ("self_attn.q_proj", "attn_q", 8),
        ("self_attn.k_proj", "attn_k", 2),
        ("self_attn.v_proj", "attn_v", 3),
        ("self_attn.o_proj", "attn_output", 0),
        ("mlp.gate_proj", "ffn_gate", 8),
        ("mlp.up_proj", "ffn_up", 2),
        ("mlp.down_proj", "ffn_down", 1),
        ("input_layernorm", "attn_norm", 0),
        ("post_attention_layernorm", "ffn_norm", 0),
    ];
    let (module, suffix) = inner.rsplit_once('.').unwrap();
    let (_, short, kind) = map.iter().find(|(h, _, _)| *h == module).unwrap();
    (format!("blk.{layer}.{short}.{suffix}"), *kind)
}

/// A two-layer random Llama (hidden 32) as GGUF, its tensors in every supported type, with a
/// byte-level BPE tokenizer and some metadata of every value type.
fn gguf_seed(device: &burn::tensor::Device) -> GgufSeed {
    let config = DecoderConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        vocab_size: 32,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        ..DecoderConfig::smollm2_135m()
    };
    let params = CausalLm::random(config, 7, device).unwrap().base_params();
    let tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = params
        .iter()
        .map(|(name, t)| {
            let (gguf, kind) = gguf_tensor(name);
            let dims = t.shape().iter().rev().map(|&d| d as u64).collect();
            (gguf, dims, kind, encode_gguf(kind, t.values()))
        })
        .collect();
    write_gguf(
        &[
            ("general.name", Kv::Str("fuzz")),
            ("general.file_type", Kv::U32(1)),
            ("llama.embedding_length", Kv::U32(32)),
            ("llama.feed_forward_length", Kv::U64(64)),
            ("llama.block_count", Kv::U64(2)),
            ("llama.attention.head_count", Kv::U32(2)),
            ("llama.attention.head_count_kv", Kv::U32(1)),
            ("llama.rope.dimension_count", Kv::U32(16)),
            ("llama.rope.freq_base", Kv::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
            ("llama.context_length", Kv::U64(64)),
            ("llama.vocab_size", Kv::U32(32)),
            ("fuzz.f64", Kv::F64(0.5)),
            ("fuzz.bool", Kv::Bool(true)),
            ("fuzz.nested", Kv::Nested(&[&[1, 2], &[], &[3]])),
            ("tokenizer.ggml.model", Kv::Str("gpt2")),
            (
                "tokenizer.ggml.tokens",
                Kv::Strs(&["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "Ġab"]),
            ),
            ("tokenizer.ggml.merges", Kv::Strs(&["a b", "Ġ a", "Ġa b"])),
            (
                "tokenizer.ggml.token_type",
                Kv::I32s(&[3, 3, 1, 1, 1, 1, 1, 1]),
            ),
            ("tokenizer.ggml.bos_token_id", Kv::U32(0)),
        ],
        &tensors,
    )
}

#[derive(Clone, Debug)]
enum GgufEdit {
    Bytes(Mutation),
    /// Overwrites a count, length, type id, dimension or integer value by name.
    Field {
        field: GgufField,
        value: u64,
    },
}

fn apply_gguf(seed: &GgufSeed, edits: &[GgufEdit]) -> Vec<u8> {
    let mut out = seed.bytes.clone();
    for edit in edits {
        match edit {
            GgufEdit::Bytes(m) => apply_mutation(&mut out, m),
            GgufEdit::Field { field, value } => {
                if field.at + field.width <= out.len() {
                    out[field.at..field.at + field.width]
                        .copy_from_slice(&value.to_le_bytes()[..field.width]);
                }
            }
        }
    }
    out
}

#[test]
fn gguf_reader() {
    let device = device();
    let seed = gguf_seed(&device);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.gguf");
    std::fs::write(&path, &seed.bytes).unwrap();
    let file = GgufFile::open(&path).expect("the seed opens");
    file.decoder_config()
        .expect("the seed has a decoder config");
    let tokenizer = Tokenizer::from_gguf(&file).expect("the seed has a tokenizer");
    assert!(!tokenizer.encode(" ab a", false).unwrap().is_empty());
    drop(file);
    CausalLm::from_gguf(&path, &device).expect("the seed loads as a model");

    let len = seed.bytes.len();
    let edit = prop_oneof![
        1 => mutation(len, seed.data_start).prop_map(GgufEdit::Bytes),
        1 => (
            select(seed.fields.clone()),
            prop_oneof![
                3 => select(INTERESTING_INTS.to_vec()),
                2 => 0u64..40,
                1 => select(vec![64u64, 128, 256, 1024]),
            ],
        )
            .prop_map(|(field, value)| GgufEdit::Field { field, value }),
    ];
    let tally = Tally::default();
    fuzz("gguf", 2048, 256, vec(edit, 1..=2), |edits| {
        let bytes = apply_gguf(&seed, &edits);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let opened = no_panic("GgufFile::open", || GgufFile::open(&path))?;
        tally.outcome("open", &opened);
        if is_strict_prefix(&bytes, &seed.bytes) {
            prop_assert!(opened.is_err(), "a truncated GGUF file opened");
        }
        if changed_only_after(&bytes, &seed.bytes, seed.data_start) {
            prop_assert!(
                opened.is_ok(),
                "changing only tensor data made the file unreadable: {}",
                opened.as_ref().err().unwrap()
            );
        }
        let Ok(file) = opened else {
            return Ok(());
        };
        let config = no_panic("GgufFile::decoder_config", || file.decoder_config())?;
        tally.outcome("config", &config);
        no_panic("GgufFile::tensor", || {
            for name in file.tensors.keys() {
                let _ = file.tensor(name);
            }
        })?;
        no_panic("Tokenizer::from_gguf and encode/decode", || {
            let tokenizer = Tokenizer::from_gguf(&file);
            tally.outcome("tokenizer", &tokenizer);
            if let Ok(tokenizer) = tokenizer
                && let Ok(ids) = tokenizer.encode(" ab a</s>", false)
            {
                let _ = tokenizer.decode(&ids, false);
            }
        })?;
        drop(file);
        let model = no_panic("CausalLm::from_gguf", || {
            CausalLm::from_gguf(&path, &device)
        })?;
        tally.outcome("model", &model);
        if let Ok(model) = model {
            let _ = no_panic("generate_greedy on the loaded model", || {
                model.generate_greedy(&[1, 2, 3], 2, &[])
            })?;
        }
        Ok(())
    });
    tally.report("gguf");
}

// ---------------------------------------------------------------------------------------------
// 2. Safetensors
// ---------------------------------------------------------------------------------------------

/// Three small f32 tensors, LoRA-named, as `ParamMap::to_safetensors_bytes` writes them.
fn small_map() -> ParamMap {
    let mut map = ParamMap::new();
    let ramp = |n: usize| (0..n).map(|i| i as f32 * 0.25 - 1.0).collect::<Vec<f32>>();
    map.insert(
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        HostTensor::new(vec![2, 8], ramp(16)).unwrap(),
    );
    map.insert(
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        HostTensor::new(vec![8, 2], ramp(16)).unwrap(),
    );
    map.insert(
        "norm",
        HostTensor::new(vec![3], vec![1.0, -2.0, 0.5]).unwrap(),
    );
    map
}

/// An f16 and a bf16 tensor, as other writers (PyTorch) store them.
fn half_precision_safetensors() -> Vec<u8> {
    let header = json!({
        "__metadata__": {"format": "pt"},
        "h": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
    });
    let mut data: Vec<u8> = [1.0f32, -0.5, 65504.0, 0.0]
        .iter()
        .flat_map(|&v| f16_bytes(v))
        .collect();
    data.extend(
        [3.0f32, -1.0, 0.25, 8.0]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
    );
    safetensors_with_header(header.as_object().unwrap(), &data)
}

fn is_decoding_error(e: &Error) -> bool {
    matches!(
        e,
        Error::MalformedSafetensors { .. }
            | Error::UnsupportedDtype { .. }
            | Error::NonFinite { .. }
    )
}

/// Whether two maps hold the same names, shapes and value bits (NaN included).
fn same_bits(a: &ParamMap, b: &ParamMap) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((na, ta), (nb, tb))| {
            na == nb
                && ta.shape() == tb.shape()
                && ta
                    .values()
                    .iter()
                    .zip(tb.values())
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        })
}

/// Checks one decoded safetensors input against what its derivation guarantees.
fn check_decoded(
    seed: &SafetensorsSeed,
    input: &StInput,
    decoded: &devft::Result<ParamMap>,
    tally: &Tally,
) -> Result<(), TestCaseError> {
    tally.outcome("decode", decoded);
    if let Err(e) = decoded {
        prop_assert!(is_decoding_error(e), "unexpected error kind: {e}");
    }
    if is_strict_prefix(&input.bytes, &seed.bytes) {
        tally.hit("truncated");
        prop_assert!(decoded.is_err(), "a truncated buffer decoded");
    }
    if changed_only_after(&input.bytes, &seed.bytes, seed.data_start) {
        tally.hit("data only");
        prop_assert!(
            decoded.is_ok(),
            "changing only tensor data made the buffer undecodable: {}",
            decoded.as_ref().err().unwrap()
        );
    }
    if let Ok(map) = decoded {
        // What was decoded is a map like any other: it encodes, and decodes to itself.
        let again = ParamMap::from_safetensors_bytes(&map.to_safetensors_bytes().unwrap(), "again");
        prop_assert!(
            again.as_ref().is_ok_and(|a| same_bits(a, map)),
            "a decoded map does not survive re-encoding: {:?}",
            again.err()
        );
    }
    Ok(())
}

#[test]
fn safetensors_bytes() {
    let seeds = [
        (
            "safetensors f32",
            small_map().to_safetensors_bytes().unwrap(),
        ),
        ("safetensors f16/bf16", half_precision_safetensors()),
    ];
    for (name, bytes) in seeds {
        let seed = SafetensorsSeed::new(bytes);
        ParamMap::from_safetensors_bytes(&seed.bytes, "seed").expect("the seed decodes");
        let tally = Tally::default();
        fuzz(name, 2048, 256, st_case(&seed), |case| {
            let input = build_st(&seed, &case);
            let decoded = no_panic("ParamMap::from_safetensors_bytes", || {
                ParamMap::from_safetensors_bytes(&input.bytes, "fuzz")
            })?;
            check_decoded(&seed, &input, &decoded, &tally)
                .map_err(|e| TestCaseError::fail(format!("{e}; header edits {:?}", input.log)))
        });
        tally.report(name);
    }
}

#[test]
fn model_safetensors() {
    let device = device();
    let seed =
        SafetensorsSeed::new(std::fs::read(tiny_llama_dir().join("model.safetensors")).unwrap());
    let tally = Tally::default();
    fuzz("model.safetensors", 512, 64, st_case(&seed), |case| {
        let input = build_st(&seed, &case);
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            tiny_llama_dir().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &input.bytes).unwrap();
        let loaded = no_panic("CausalLm::load", || CausalLm::load(dir.path(), &device))?;
        tally.outcome("load", &loaded);
        if is_strict_prefix(&input.bytes, &seed.bytes) {
            tally.hit("truncated");
            prop_assert!(loaded.is_err(), "a truncated model.safetensors loaded");
        }
        if input.entries_changed == Some(true) {
            tally.hit("header changed");
            prop_assert!(
                loaded.is_err(),
                "a model loaded after its header changed: {:?}",
                input.log
            );
        }
        Ok(())
    });
    tally.report("model.safetensors");
}

// ---------------------------------------------------------------------------------------------
// 3. config.json
// ---------------------------------------------------------------------------------------------

/// The sizes `HfConfig` requires, as non-negative integers.
const REQUIRED_SIZES: [&str; 5] = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
];

const OTHER_CONFIG_FIELDS: [&str; 19] = [
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters.rope_theta",
    "rope_parameters.rope_type",
    "rope_parameters.factor",
    "rope_parameters.low_freq_factor",
    "rope_parameters.high_freq_factor",
    "rope_parameters.original_max_position_embeddings",
    "sliding_window",
    "use_sliding_window",
    "model_type",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
];

/// Structured edits and/or byte mutations of a JSON file.
#[derive(Clone, Debug)]
struct JsonCase {
    edits: Vec<JsonEdit>,
    bytes: Vec<Mutation>,
}

fn json_case(edit: BoxedStrategy<JsonEdit>, len: usize) -> BoxedStrategy<JsonCase> {
    prop_oneof![
        3 => vec(edit.clone(), 1..=3).prop_map(|edits| JsonCase { edits, bytes: Vec::new() }),
        2 => mutations(len, len).prop_map(|bytes| JsonCase { edits: Vec::new(), bytes }),
        1 => (vec(edit, 1..=2), mutations(len, len))
            .prop_map(|(edits, bytes)| JsonCase { edits, bytes }),
    ]
    .boxed()
}

/// The fields of a resolved config that decide the shapes of the checkpoint's tensors.
fn shape_fields(c: &DecoderConfig) -> [usize; 10] {
    [
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        usize::from(c.qkv_bias),
        usize::from(c.o_bias),
        usize::from(c.mlp_bias),
    ]
}

#[test]
fn model_config_json() {
    let device = device();
    let seed_path = tiny_llama_dir().join("config.json");
    let seed_text = std::fs::read(&seed_path).unwrap();
    let seed_doc: Value = serde_json::from_slice(&seed_text).unwrap();
    let seed_config = HfConfig::load(&seed_path).unwrap().resolve().unwrap();
    let weights = tiny_llama_dir().join("model.safetensors");

    let edit = prop_oneof![
        3 => (select(REQUIRED_SIZES.to_vec()), size_value()).prop_map(|(f, v)| JsonEdit::Set(f, v)),
        2 => (select(OTHER_CONFIG_FIELDS.to_vec()), size_value()).prop_map(|(f, v)| JsonEdit::Set(f, v)),
        2 => (select(OTHER_CONFIG_FIELDS.to_vec()), json_any()).prop_map(|(f, v)| JsonEdit::Set(f, v)),
        1 => select([&REQUIRED_SIZES[..], &OTHER_CONFIG_FIELDS[..]].concat()).prop_map(JsonEdit::Remove),
    ]
    .boxed();
    let len = serde_json::to_string_pretty(&seed_doc).unwrap().len();
    let tally = Tally::default();
    fuzz("config.json", 2048, 256, json_case(edit, len), |case| {
        let (_, text) = edit_json(&seed_doc, &case.edits);
        let text = mutate(&text, &case.bytes);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, &text).unwrap();
        let loaded = no_panic("HfConfig::load", || HfConfig::load(&path))?;
        tally.outcome("load", &loaded);
        if case.bytes.is_empty() {
            for field in REQUIRED_SIZES {
                match final_edit(&case.edits, field) {
                    Final::Set(value) if value.as_u64().is_none() => prop_assert!(
                        loaded.is_err(),
                        "`{field}` = {value:?} is not a size, yet the config loaded"
                    ),
                    Final::Removed => {
                        prop_assert!(loaded.is_err(), "`{field}` removed, yet the config loaded")
                    }
                    _ => {}
                }
            }
        }
        let Ok(hf) = loaded else {
            return Ok(());
        };
        let resolved = no_panic("HfConfig::resolve", || hf.resolve())?;
        tally.outcome("resolve", &resolved);
        for field in REQUIRED_SIZES {
            if let Final::Set(value) = final_edit(&case.edits, field)
                && case.bytes.is_empty()
                && value.as_u64() == Some(0)
            {
                prop_assert!(resolved.is_err(), "`{field}` = 0 resolved");
            }
        }
        let Ok(config) = resolved else {
            return Ok(());
        };
        std::os::unix::fs::symlink(&weights, dir.path().join("model.safetensors"))
            .or_else(|_| std::fs::copy(&weights, dir.path().join("model.safetensors")).map(|_| ()))
            .unwrap();
        let model = no_panic("CausalLm::load", || CausalLm::load(dir.path(), &device))?;
        tally.outcome("model", &model);
        if shape_fields(&config) != shape_fields(&seed_config) {
            prop_assert!(
                model.is_err(),
                "the fixture's weights loaded under other sizes: {:?}",
                shape_fields(&config)
            );
        }
        Ok(())
    });
    tally.report("config.json");
}

// ---------------------------------------------------------------------------------------------
// 4. PEFT adapter
// ---------------------------------------------------------------------------------------------

/// PEFT options that change what an adapter computes: set to anything but a neutral value
/// (`null`, `false`, `[]`, `{}`), devft must refuse the adapter.
const REFUSED_OPTIONS: [&str; 16] = [
    "use_dora",
    "use_rslora",
    "fan_in_fan_out",
    "layers_to_transform",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "exclude_modules",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
];

/// Keys whose values devft may accept or refuse; only a panic is wrong.
const OTHER_ADAPTER_KEYS: [&str; 10] = [
    "peft_version",
    "revision",
    "init_lora_weights",
    "frobnicate",
    "lora_alpha",
    "lora_dropout",
    "peft_type",
    "bias",
    "task_type",
    "inference_mode",
];

fn rank_value() -> BoxedStrategy<Jv> {
    let ranks = vec![
        json!(0),
        json!(1),
        json!(4),
        json!(8),
        json!(100_000),
        json!(10_000_000),
        json!(1_u64 << 62),
        json!(65_536),
        json!(65_537),
        json!(u64::MAX),
        json!(-1),
        json!(4.0),
        Value::Null,
        json!("4"),
    ];
    prop_oneof![6 => select(ranks).prop_map(Jv::V), 1 => select(RAW_NUMBERS.to_vec()).prop_map(Jv::Raw)]
        .boxed()
}

fn option_value() -> BoxedStrategy<Jv> {
    select(vec![
        json!(true),
        json!(1),
        json!("x"),
        json!([0]),
        json!({"a": 1}),
        json!(0.5),
        Value::Null,
        json!(false),
        json!([]),
        json!({}),
    ])
    .prop_map(Jv::V)
    .boxed()
}

fn target_modules_value() -> BoxedStrategy<Jv> {
    select(vec![
        json!(["q_proj"]),
        json!([]),
        json!(["nope"]),
        json!("all-linear"),
        Value::Null,
        json!(["q_proj", "q_proj"]),
        json!([1]),
    ])
    .prop_map(Jv::V)
    .boxed()
}

#[derive(Clone, Debug)]
struct PeftCase {
    config: JsonCase,
    tensors: Option<StCase>,
}

#[test]
fn peft_adapter() {
    let device = device();
    let model = CausalLm::load(tiny_llama_dir(), &device).unwrap();
    let adapter = tiny_llama_dir().join("adapter");
    let config_doc: Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    let tensors =
        SafetensorsSeed::new(std::fs::read(adapter.join("adapter_model.safetensors")).unwrap());
    import_adapter(&model, &adapter).expect("the seed adapter imports");

    let edit = prop_oneof![
        3 => rank_value().prop_map(|v| JsonEdit::Set("r", v)),
        3 => (select(REFUSED_OPTIONS.to_vec()), option_value()).prop_map(|(k, v)| JsonEdit::Set(k, v)),
        1 => target_modules_value().prop_map(|v| JsonEdit::Set("target_modules", v)),
        2 => (select(OTHER_ADAPTER_KEYS.to_vec()), json_any()).prop_map(|(k, v)| JsonEdit::Set(k, v)),
        1 => select(vec!["r", "lora_alpha", "target_modules", "peft_type"]).prop_map(JsonEdit::Remove),
    ]
    .boxed();
    let len = serde_json::to_string_pretty(&config_doc).unwrap().len();
    let unchanged = JsonCase {
        edits: Vec::new(),
        bytes: Vec::new(),
    };
    let strategy = prop_oneof![
        2 => json_case(edit.clone(), len).prop_map(|config| PeftCase { config, tensors: None }),
        2 => st_case(&tensors).prop_map(move |t| PeftCase { config: unchanged.clone(), tensors: Some(t) }),
        1 => (vec(edit, 1..=2), st_case(&tensors)).prop_map(|(edits, t)| PeftCase {
            config: JsonCase { edits, bytes: Vec::new() },
            tensors: Some(t),
        }),
    ];
    let tally = Tally::default();
    fuzz("adapter", 1024, 128, strategy, |case| {
        let (_, config_text) = edit_json(&config_doc, &case.config.edits);
        let config_text = mutate(&config_text, &case.config.bytes);
        let input = case.tensors.as_ref().map(|t| build_st(&tensors, t));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), &config_text).unwrap();
        std::fs::write(
            dir.path().join("adapter_model.safetensors"),
            input.as_ref().map_or(&tensors.bytes, |i| &i.bytes),
        )
        .unwrap();
        let imported = no_panic("import_adapter", || import_adapter(&model, dir.path()))?;
        tally.outcome("import", &imported);
        let config_edits_only = case.config.bytes.is_empty() && case.tensors.is_none();
        if config_edits_only {
            match final_edit(&case.config.edits, "r") {
                Final::Set(value) if value.as_u64() != Some(4) => prop_assert!(
                    imported.is_err(),
                    "r = {value:?} disagrees with the rank-4 tensors, yet the adapter imported"
                ),
                Final::Removed => {
                    prop_assert!(imported.is_err(), "r removed, yet the adapter imported")
                }
                _ => {}
            }
            for key in REFUSED_OPTIONS {
                if let Final::Set(value) = final_edit(&case.config.edits, key)
                    && !value.is_neutral()
                {
                    prop_assert!(
                        imported.is_err(),
                        "`{key}` = {value:?} changes the adapter's math, yet it imported"
                    );
                }
            }
        }
        if let Some(input) = &input {
            if is_strict_prefix(&input.bytes, &tensors.bytes) {
                prop_assert!(imported.is_err(), "a truncated adapter imported");
            }
            if input.entries_changed == Some(true) && case.config.edits.is_empty() {
                prop_assert!(
                    imported.is_err(),
                    "an adapter imported after its header changed: {:?}",
                    input.log
                );
            }
        }
        Ok(())
    });
    tally.report("adapter");
}

// ---------------------------------------------------------------------------------------------
// 5. Protocol messages
// ---------------------------------------------------------------------------------------------

/// The byte limit of a decode, relative to the mutated message's length.
#[derive(Clone, Debug)]
enum Limit {
    Unlimited,
    Exact,
    OneShort,
    Fixed(usize),
}

/// Which message a case mutates.
#[derive(Clone, Copy, Debug)]
enum MessageKind {
    Reply,
    Task,
    Setup,
}

/// A valid message of each kind, with tensors in several sections.
fn message_seed(kind: MessageKind) -> Vec<u8> {
    let other = small_map().renamed(|n| format!("{n}.x"));
    match kind {
        MessageKind::Reply => TrainReply {
            round: 3,
            client: 1,
            num_examples: 9,
            metrics: [("train_loss".to_string(), 1.5)].into(),
            adapter: small_map(),
        }
        .to_bytes(),
        MessageKind::Task => TrainTask {
            round: 3,
            stage: 1,
            seed: 7,
            instructions: ClientInstructions::default(),
            local: LocalTrainingConfig::new(),
            adapter: small_map(),
            merges: MergeSync {
                first: 1,
                merges: vec![other.clone(), small_map()],
            },
        }
        .to_bytes(),
        MessageKind::Setup => StageSetup {
            stage: 1,
            grouping: Grouping::new(vec![vec![0, 2], vec![1]], 3).unwrap(),
            fuser: "mean".into(),
            start: StartAdapter::Full {
                adapter: small_map(),
            },
            history: vec![MergedStage {
                grouping: Grouping::singletons(3),
                merges: vec![other],
            }],
        }
        .to_bytes(),
    }
    .unwrap()
}

/// Decodes `bytes` as `kind`; a decoded message must survive its own round trip.
fn decode_message(
    kind: MessageKind,
    bytes: &[u8],
    max_bytes: usize,
) -> Result<devft::Result<()>, TestCaseError> {
    fn check<M: Message>(
        bytes: &[u8],
        max_bytes: usize,
    ) -> Result<devft::Result<()>, TestCaseError> {
        let decoded = no_panic("decode", || M::from_bytes(bytes, max_bytes, "fuzz"))?;
        let Ok(message) = decoded else {
            return Ok(decoded.map(|_| ()));
        };
        // Compared as bytes: a mutated value may be NaN, which is not equal to itself.
        let bytes = message.to_bytes().unwrap();
        let again = M::from_bytes(&bytes, usize::MAX, "again").map(|m| m.to_bytes().unwrap());
        prop_assert_eq!(again.ok(), Some(bytes), "no round trip");
        Ok(Ok(()))
    }
    match kind {
        MessageKind::Reply => check::<TrainReply>(bytes, max_bytes),
        MessageKind::Task => check::<TrainTask>(bytes, max_bytes),
        MessageKind::Setup => check::<StageSetup>(bytes, max_bytes),
    }
}

#[test]
fn protocol_messages() {
    let kinds = [MessageKind::Reply, MessageKind::Task, MessageKind::Setup];
    let seeds: Vec<Vec<u8>> = kinds.iter().map(|&k| message_seed(k)).collect();
    for (&kind, seed) in kinds.iter().zip(&seeds) {
        assert!(decode_message(kind, seed, usize::MAX).unwrap().is_ok());
    }
    let limit = prop_oneof![
        4 => Just(Limit::Unlimited),
        1 => Just(Limit::Exact),
        1 => Just(Limit::OneShort),
        1 => select(vec![0usize, 8, 64]).prop_map(Limit::Fixed),
    ];
    // The hot region is the preamble and the JSON header, where the counts live.
    let header_end =
        |seed: &[u8]| 20 + u64::from_le_bytes(seed[12..20].try_into().unwrap()) as usize;
    let longest = seeds.iter().map(Vec::len).max().unwrap();
    let hot = seeds.iter().map(|s| header_end(s)).max().unwrap();
    let tally = Tally::default();
    fuzz(
        "protocol",
        4096,
        256,
        (0..kinds.len(), mutations(longest, hot), limit),
        |(which, edits, limit)| {
            let input = mutate(&seeds[which], &edits);
            let max_bytes = match limit {
                Limit::Unlimited => usize::MAX,
                Limit::Exact => input.len(),
                Limit::OneShort => input.len().saturating_sub(1),
                Limit::Fixed(n) => n,
            };
            let decoded = decode_message(kinds[which], &input, max_bytes)?;
            tally.outcome(&format!("{:?}", kinds[which]), &decoded);
            match &decoded {
                Err(Error::InvalidMessage { sender, .. }) => prop_assert_eq!(sender, "fuzz"),
                Err(e) => prop_assert!(false, "not an InvalidMessage: {e}"),
                Ok(()) => prop_assert!(input.len() <= max_bytes, "accepted over the limit"),
            }
            Ok(())
        },
    );
    tally.report("protocol");
}

// ---------------------------------------------------------------------------------------------
// 6. Checkpoint resume
// ---------------------------------------------------------------------------------------------

/// Rounds of the fuzzed run: two on a two-layer submodel, one on the full model.
const FL_ROUNDS: usize = 3;

/// A tiny DevFT run with checkpoints in `dir`, stopped after round `stop` if given.
fn fl_run(dir: &Path, stop: Option<usize>) -> devft::Result<devft::federated::RunOutcome> {
    let (clients, eval) = tiny_federated_data();
    let local = LocalTrainingConfig::new()
        .with_learning_rate(5e-3)
        .with_local_steps(1)
        .with_batch_size(4);
    let config = FederatedConfig::new(FL_ROUNDS, local)
        .with_clients_per_round(2)
        .with_seed(11);
    let strategy = RunStrategy {
        scheduler: Box::new(ExplicitScheduler::stages(&[
            Stage {
                capacity: 2,
                rounds: 2,
            },
            Stage {
                capacity: 8,
                rounds: 1,
            },
        ])),
        grouper: Box::new(SpectralGrouper::new()),
        fuser: Box::new(DifferentialFuser::default()),
    };
    let mut run =
        FederatedRun::new(config, strategy, Box::new(FedAvg), clients, eval)?.with_checkpoints(dir);
    if let Some(stop) = stop {
        run = run.stop_after_round(stop);
    }
    let model =
        CausalLm::load(tiny_llama_dir(), &device())?.with_lora(&LoraConfig::new(4, 8.0), 0)?;
    run.run(model, &device().autodiff())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The round directory `LATEST` names in a checkpoint directory.
fn latest_round(dir: &Path) -> PathBuf {
    dir.join(std::fs::read_to_string(dir.join("LATEST")).unwrap().trim())
}

const CHECKPOINT_TENSORS: [&str; 5] = [
    "stage_start_lora",
    "global",
    "aggregator",
    "personal",
    "merges",
];

/// Which checkpoint a case starts from.
#[derive(Clone, Copy, Debug)]
enum CheckpointSeed {
    /// After round 1: mid-way through stage 0 (two fused layers).
    MidStage,
    /// After round 2: stage 0 finished, stage 1 (all eight layers) not begun.
    BetweenStages,
}

#[derive(Clone, Debug)]
enum ResumeEdit {
    /// Structured edits of `state.json`.
    State(Vec<JsonEdit>),
    /// A layer index of the grouping: `groups[group][member]` (wrapping) set to `value`.
    Layer {
        group: usize,
        member: usize,
        value: Jv,
    },
    /// `grouping.groups` replaced.
    Groups(&'static str),
    /// `plan` replaced.
    Plan(&'static str),
    StateBytes(Vec<Mutation>),
    Tensors(&'static str, StCase),
    /// `LATEST` overwritten.
    Latest(&'static str),
}

const STATE_COUNTERS: [&str; 5] = [
    "stage",
    "rounds_done",
    "rounds_done_in_stage",
    "seed",
    "num_clients",
];

const PLAN_FIELDS: [&str; 6] = [
    "plan.0.capacity",
    "plan.0.rounds",
    "plan.1.capacity",
    "plan.1.rounds",
    "plan.2.capacity",
    "plan.2.rounds",
];

fn resume_edit() -> BoxedStrategy<ResumeEdit> {
    let counter =
        (select(STATE_COUNTERS.to_vec()), size_value()).prop_map(|(k, v)| JsonEdit::Set(k, v));
    let plan = (select(PLAN_FIELDS.to_vec()), size_value()).prop_map(|(k, v)| JsonEdit::Set(k, v));
    let misc = select(vec![
        JsonEdit::Set("metrics", Jv::V(json!([]))),
        JsonEdit::Set("stage_outcomes", Jv::V(json!([]))),
        JsonEdit::Set("ledger", Jv::V(json!({}))),
        JsonEdit::Remove("grouping"),
        JsonEdit::Remove("plan"),
        JsonEdit::Remove("rounds_done"),
    ]);
    let state = prop_oneof![4 => counter, 4 => plan, 1 => misc];
    prop_oneof![
        4 => vec(state, 1..=2).prop_map(ResumeEdit::State),
        2 => (0usize..8, 0usize..8, size_value())
            .prop_map(|(group, member, value)| ResumeEdit::Layer { group, member, value }),
        1 => select(vec![
            "[]",
            "[[]]",
            "[[0,1,2,3,4,5,6,7]]",
            "[[0],[0]]",
            "[[0,1,2,3],[4,5,6,7],[8]]",
            "[[7,6,5,4],[3,2,1,0]]",
            "[[0,1,2,3,4,5,6],[7],[]]",
            "[[0],[1],[2],[3],[4],[5],[6],[7]]",
        ])
        .prop_map(ResumeEdit::Groups),
        1 => select(vec![
            "[]",
            r#"[{"capacity":8,"rounds":3}]"#,
            r#"[{"capacity":2,"rounds":2},{"capacity":8,"rounds":1000000000}]"#,
            r#"[{"capacity":8,"rounds":1},{"capacity":2,"rounds":2}]"#,
            r#"[{"capacity":0,"rounds":2},{"capacity":8,"rounds":1}]"#,
            r#"[{"capacity":16,"rounds":2},{"capacity":8,"rounds":1}]"#,
            r#"[{"capacity":2,"rounds":0},{"capacity":8,"rounds":3}]"#,
        ])
        .prop_map(ResumeEdit::Plan),
        2 => mutations(4096, 4096).prop_map(ResumeEdit::StateBytes),
        3 => (select(CHECKPOINT_TENSORS.to_vec()), prop_oneof![
                2 => mutations(4096, 512).prop_map(StCase::Bytes),
                2 => vec(header_edit(), 1..=2).prop_map(StCase::Header),
                1 => (0usize..3).prop_map(StCase::Keep),
            ])
            .prop_map(|(file, case)| ResumeEdit::Tensors(file, case)),
        1 => select(vec!["", "round-999999", "..", "/", "round-000001/../round-000001", "LATEST"])
            .prop_map(ResumeEdit::Latest),
    ]
    .boxed()
}

/// `state.json` as a document: the layer edit resolved to a path, groups and plan replaced.
fn edit_state(doc: &mut Value, edit: &ResumeEdit) -> Vec<JsonEdit> {
    match edit {
        ResumeEdit::State(edits) => edits.clone(),
        ResumeEdit::Layer {
            group,
            member,
            value,
        } => {
            let groups = doc["grouping"]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if groups.is_empty() {
                return Vec::new();
            }
            let g = group % groups.len();
            let members = groups[g].as_array().map_or(1, Vec::len).max(1);
            // Dotted paths index objects only, so edit the array in place.
            if let Some(slot) = doc["grouping"]["groups"][g].get_mut(member % members) {
                *slot = match value {
                    Jv::V(v) => v.clone(),
                    Jv::Raw(raw) => Value::String(format!("{raw} (as a string)")),
                };
            }
            Vec::new()
        }
        ResumeEdit::Groups(json) => {
            doc["grouping"]["groups"] = serde_json::from_str(json).unwrap();
            Vec::new()
        }
        ResumeEdit::Plan(json) => {
            doc["plan"] = serde_json::from_str(json).unwrap();
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Turns `plan.N.field` edits into edits of the plan array (dotted paths only reach objects).
fn edit_plan_entries(doc: &mut Value, edits: &mut Vec<JsonEdit>) {
    edits.retain(|edit| {
        let JsonEdit::Set(path, value) = edit else {
            return true;
        };
        let Some(rest) = path.strip_prefix("plan.") else {
            return true;
        };
        let (index, field) = rest.split_once('.').unwrap();
        let index: usize = index.parse().unwrap();
        if let Some(stage) = doc["plan"].get_mut(index).and_then(Value::as_object_mut) {
            stage.insert(
                field.to_string(),
                match value {
                    Jv::V(v) => v.clone(),
                    Jv::Raw(raw) => Value::String(format!("{raw} (as a string)")),
                },
            );
        }
        false
    });
}

/// What a resumed run returned, reduced to what can cross threads.
#[derive(Debug)]
struct ResumeSummary {
    completed: bool,
    last_round: Option<usize>,
}

/// Resumes the run in `dir` on its own thread; a run that has not returned after `limit` is a
/// hang (its thread is left behind).
fn resume_with_deadline(
    dir: PathBuf,
    limit: Duration,
) -> Result<Result<ResumeSummary, String>, TestCaseError> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("fuzz-resume".into())
        .spawn(move || {
            let result = fl_run(&dir, None)
                .map(|outcome| ResumeSummary {
                    completed: outcome.completed,
                    last_round: outcome.metrics.last().map(|m| m.round),
                })
                .map_err(|e| e.to_string());
            let _ = tx.send(result);
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(result) => {
            let _ = handle.join();
            Ok(result)
        }
        Err(RecvTimeoutError::Timeout) => Err(TestCaseError::fail(format!(
            "the resumed run had not returned after {limit:?} (a hang)"
        ))),
        Err(RecvTimeoutError::Disconnected) => {
            let payload = handle.join().expect_err("the thread ended without sending");
            Err(TestCaseError::fail(format!(
                "the resumed run panicked: {}",
                panic_message(&*payload)
            )))
        }
    }
}

#[test]
fn checkpoint_resume() {
    let seeds = tempfile::tempdir().unwrap();
    let work = seeds.path().join("work");
    let mid = seeds.path().join("mid-stage");
    let between = seeds.path().join("between-stages");
    assert!(!fl_run(&work, Some(1)).unwrap().completed);
    copy_dir(&work, &mid);
    assert!(!fl_run(&work, Some(2)).unwrap().completed);
    copy_dir(&work, &between);
    let seed_state = |dir: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(latest_round(dir).join("state.json")).unwrap())
            .unwrap()
    };
    let (mid_state, between_state) = (seed_state(&mid), seed_state(&between));
    assert_eq!(mid_state["rounds_done_in_stage"], json!(1));
    assert_eq!(between_state["rounds_done_in_stage"], json!(0));
    // The structured edits name these keys: they must still exist, or the edits would only add
    // unknown keys.
    for state in [&mid_state, &between_state] {
        for key in STATE_COUNTERS.iter().chain(&["plan", "metrics", "ledger"]) {
            assert!(state.get(key).is_some(), "state.json has no `{key}`");
        }
        assert!(
            state["grouping"]["groups"].is_array(),
            "state.json has no grouping.groups"
        );
        assert!(state["plan"][1]["capacity"].is_u64() && state["plan"][1]["rounds"].is_u64());
    }

    let seed = prop_oneof![
        Just(CheckpointSeed::MidStage),
        Just(CheckpointSeed::BetweenStages)
    ];
    let strategy = (seed, vec(resume_edit(), 1..=2));
    // No shrinking: a hung case leaves its thread running, and each case trains.
    let tally = Tally::default();
    fuzz("checkpoint resume", 256, 0, strategy, |(which, edits)| {
        let (source, state) = match which {
            CheckpointSeed::MidStage => (&mid, &mid_state),
            CheckpointSeed::BetweenStages => (&between, &between_state),
        };
        let case_dir = tempfile::tempdir().unwrap();
        let dir = case_dir.path().join("checkpoints");
        copy_dir(source, &dir);
        let round = latest_round(&dir);

        let mut doc = state.clone();
        let mut json_edits = Vec::new();
        for edit in &edits {
            json_edits.extend(edit_state(&mut doc, edit));
        }
        edit_plan_entries(&mut doc, &mut json_edits);
        let (doc, mut text) = edit_json(&doc, &json_edits);
        let mut state_bytes_mutated = false;
        for edit in &edits {
            match edit {
                ResumeEdit::StateBytes(m) => {
                    text = mutate(&text, m);
                    state_bytes_mutated = true;
                }
                ResumeEdit::Tensors(file, case) => {
                    // Byte mutations stack on earlier edits of the file; structured edits
                    // start again from the seed's file, whose header is known to parse.
                    let name = format!("{file}.safetensors");
                    let path = round.join(&name);
                    let bytes = match case {
                        StCase::Bytes(m) => mutate(&std::fs::read(&path).unwrap(), m),
                        _ => {
                            let pristine = latest_round(source).join(&name);
                            let seed = SafetensorsSeed::new(std::fs::read(pristine).unwrap());
                            build_st(&seed, case).bytes
                        }
                    };
                    std::fs::write(&path, bytes).unwrap();
                }
                ResumeEdit::Latest(name) => std::fs::write(dir.join("LATEST"), name).unwrap(),
                _ => {}
            }
        }
        std::fs::write(round.join("state.json"), &text).unwrap();

        let result = resume_with_deadline(dir, Duration::from_secs(60))?;
        tally.outcome("resume", &result);
        if !state_bytes_mutated {
            for key in ["seed", "num_clients"] {
                if doc[key] != state[key] {
                    prop_assert!(
                        result.is_err(),
                        "`{key}` changed to {}, yet the run resumed: {result:?}",
                        doc[key]
                    );
                }
            }
        }
        if let Ok(summary) = &result {
            prop_assert!(
                summary.completed && summary.last_round == Some(FL_ROUNDS),
                "a resumed {FL_ROUNDS}-round run returned Ok but {summary:?}"
            );
        }
        Ok(())
    });
    tally.report("checkpoint resume");
}
