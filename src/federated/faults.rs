//! Injected client faults, to test that a run survives what real deployments see.

/// What goes wrong with a client in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The client raises an error instead of training.
    Error(String),
    /// The client never answers.
    DropOut,
    /// The client's update contains NaN.
    NanUpdate,
    /// Every value of the client's update is `3e38`: finite, but absurd.
    HugeUpdate,
    /// The client's message is cut in half.
    TruncatedUpdate,
    /// The client's message is padded far beyond the adapter's size.
    OversizedUpdate,
}

/// Decides, per round and client, whether a fault happens.
pub trait FaultInjector {
    /// The fault of `client` in global round `round`, if any.
    fn fault(&self, round: usize, client: usize) -> Option<Fault>;
}

/// Each client fails with probability `rate` in each round (seeded, reproducible), by
/// erroring or dropping out alternately.
#[derive(Debug, Clone, Copy)]
pub struct RandomFailures {
    /// Probability that a sampled client fails.
    pub rate: f64,
    /// Seed of the draws.
    pub seed: u64,
}

impl FaultInjector for RandomFailures {
    fn fault(&self, round: usize, client: usize) -> Option<Fault> {
        let mut x = self.seed ^ ((round as u64) << 32) ^ client as u64;
        // SplitMix64 finaliser: a well-mixed hash of (seed, round, client).
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let draw = (x >> 11) as f64 / (1u64 << 53) as f64;
        (draw < self.rate).then(|| {
            if x & 1 == 0 {
                Fault::Error(format!("injected failure in round {round}"))
            } else {
                Fault::DropOut
            }
        })
    }
}

impl<F: Fn(usize, usize) -> Option<Fault>> FaultInjector for F {
    fn fault(&self, round: usize, client: usize) -> Option<Fault> {
        self(round, client)
    }
}
