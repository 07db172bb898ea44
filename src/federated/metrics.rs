//! Per-round metrics and the communication ledger.

use serde::{Deserialize, Serialize};

/// One round, as written to the JSONL metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// Stage index (0-based).
    pub stage: usize,
    /// Layers of the stage's submodel.
    pub capacity: usize,
    /// Global round (1-based).
    pub round: usize,
    /// Clients asked to train.
    pub clients_sampled: Vec<usize>,
    /// Clients left out of sampling, with the reason (a declared memory budget below the
    /// stage's estimate).
    #[serde(default)]
    pub clients_excluded: Vec<(usize, String)>,
    /// Clients that failed or were rejected, with the reason.
    pub clients_failed: Vec<(usize, String)>,
    /// Example-weighted mean of the clients' local training losses.
    pub train_loss: Option<f64>,
    /// Loss of the full model (knowledge transferred) on the held-out set.
    pub eval_loss: Option<f64>,
    /// Client-to-server bytes this round.
    pub bytes_up: WireSize,
    /// Server-to-client bytes of this round's tasks.
    pub bytes_down: WireSize,
    /// Server-to-client bytes of stage set-ups sent this round (to clients new to the stage).
    #[serde(default)]
    pub bytes_setup: WireSize,
    /// Wall-clock seconds of the round (training, aggregation, evaluation; in a stage's first
    /// round also the stage's set-up: grouping and fusion).
    pub wall_seconds: f64,
    /// Of `wall_seconds`, the seconds spent evaluating on the held-out set; the rest is the
    /// round's federated work (clients' local training, coding, aggregation).
    #[serde(default)]
    pub eval_seconds: f64,
    /// Estimated training memory in bytes, the largest the round's clients report: the
    /// submodel's parameters, the trainable values with their gradients and two AdamW
    /// moments, and the activations of one batch of the client's longest examples.
    pub memory_bytes: u64,
    /// Measured peak resident memory of client training in bytes, the largest the round's
    /// clients report ([`crate::federated::measure_peak_rss`]; the process's peak while it
    /// trained). `None` where no client could measure it.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// Whether the global adapter changed (false when too few clients succeeded or the
    /// aggregator failed).
    pub aggregated: bool,
    /// Why the aggregator failed this round, if it did.
    #[serde(default)]
    pub aggregation_error: Option<String>,
    /// The scheduler's decisions made with this round: the probe's result before the first
    /// round, a stage ended early, the plan as revised.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Client-to-server bytes of the probe before the first stage (first round only; its
    /// seconds are in `wall_seconds`).
    #[serde(default)]
    pub bytes_probe_up: WireSize,
    /// Server-to-client bytes of the probe before the first stage (first round only).
    #[serde(default)]
    pub bytes_probe_down: WireSize,
}

/// Bytes exchanged with each client in each round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// `(round, client, up, down)` entries.
    pub entries: Vec<LedgerEntry>,
}

/// One client's traffic in one round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Global round.
    pub round: usize,
    /// Client id.
    pub client: usize,
    /// Client to server.
    pub up: WireSize,
    /// Server to client: the task.
    pub down: WireSize,
    /// Server to client: the stage set-up, when the client was new to the stage.
    #[serde(default)]
    pub setup: WireSize,
    /// Whether this is traffic of a federated evaluation rather than of training.
    #[serde(default)]
    pub evaluation: bool,
}

impl Ledger {
    /// Totals over all entries: `(up, down)`.
    pub fn totals(&self) -> (WireSize, WireSize) {
        let mut up = WireSize::default();
        let mut down = WireSize::default();
        for e in &self.entries {
            up += e.up;
            down += e.down;
        }
        (up, down)
    }

    /// Stage set-up bytes of one round.
    pub fn round_setup(&self, round: usize) -> WireSize {
        let mut setup = WireSize::default();
        for e in self.entries.iter().filter(|e| e.round == round) {
            setup += e.setup;
        }
        setup
    }

    /// Stage set-up bytes over all entries.
    pub fn setup_total(&self) -> WireSize {
        let mut setup = WireSize::default();
        for e in &self.entries {
            setup += e.setup;
        }
        setup
    }

    /// Totals of one round: `(up, down)`.
    pub fn round_totals(&self, round: usize) -> (WireSize, WireSize) {
        let mut up = WireSize::default();
        let mut down = WireSize::default();
        for e in self.entries.iter().filter(|e| e.round == round) {
            up += e.up;
            down += e.down;
        }
        (up, down)
    }
}

/// Bytes of a message as sent over the network: its payload (tensor data, `4 x` values) and
/// the whole message (payload plus headers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireSize {
    /// Tensor data bytes.
    pub payload: u64,
    /// Whole message bytes.
    pub total: u64,
}

impl std::ops::AddAssign for WireSize {
    fn add_assign(&mut self, other: Self) {
        self.payload += other.payload;
        self.total += other.total;
    }
}
