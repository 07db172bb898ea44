//! Central differential privacy with fixed clipping, wrapping any aggregator (as Flower's
//! `DifferentialPrivacyServerSideFixedClipping`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::aggregate::{
    Aggregator, ClientInstructions, ClientUpdate, check_updates, state_counter, zip_map,
};
use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// Each client's update `w_k - w` is scaled by `min(1, C / ||w_k - w||)` (L2 norm over the
/// whole adapter), the inner aggregator combines the clipped adapters, and Gaussian noise of
/// standard deviation `sigma = z C / m` is added to every coordinate of the result, with `z`
/// the noise multiplier, `C` the clipping norm and `m` the number of sampled clients.
///
/// The noise is drawn from a seeded RNG advanced once per round, so runs are reproducible;
/// the round counter is part of the checkpointed state.
#[derive(Debug, Clone)]
pub struct DpFixedClipping<A> {
    inner: A,
    noise_multiplier: f64,
    clipping_norm: f64,
    num_sampled_clients: usize,
    seed: u64,
    round: u64,
}

impl<A: Aggregator> DpFixedClipping<A> {
    /// Wraps `inner`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `noise_multiplier >= 0`, `clipping_norm > 0` and
    /// `num_sampled_clients > 0`.
    pub fn new(
        inner: A,
        noise_multiplier: f64,
        clipping_norm: f64,
        num_sampled_clients: usize,
        seed: u64,
    ) -> Result<Self> {
        let valid = noise_multiplier.is_finite()
            && noise_multiplier >= 0.0
            && clipping_norm.is_finite()
            && clipping_norm > 0.0
            && num_sampled_clients > 0;
        if !valid {
            return Err(Error::InvalidArgument(format!(
                "DP needs noise_multiplier >= 0, clipping_norm > 0 and sampled clients > 0; got \
                 {noise_multiplier}, {clipping_norm}, {num_sampled_clients}"
            )));
        }
        Ok(Self {
            inner,
            noise_multiplier,
            clipping_norm,
            num_sampled_clients,
            seed,
            round: 0,
        })
    }

    /// The standard deviation of the noise added to each coordinate: `z C / m`.
    pub fn noise_stddev(&self) -> f64 {
        self.noise_multiplier * self.clipping_norm / self.num_sampled_clients as f64
    }

    /// The noise multiplier `z`.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }
}

const ROUND_KEY: &str = "dp.round";

impl<A: Aggregator> Aggregator for DpFixedClipping<A> {
    fn name(&self) -> String {
        format!(
            "dp(z={}, C={}, m={}) over {}",
            self.noise_multiplier,
            self.clipping_norm,
            self.num_sampled_clients,
            self.inner.name()
        )
    }

    fn client_instructions(&self) -> ClientInstructions {
        self.inner.client_instructions()
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let clipped = updates
            .iter()
            .map(|update| -> Result<ClientUpdate> {
                let delta = zip_map(&update.params, global, |w, g| w - g)?;
                let norm = delta
                    .iter()
                    .flat_map(|(_, t)| t.values())
                    .map(|v| f64::from(*v).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let scale = if norm > 0.0 {
                    (self.clipping_norm / norm).min(1.0)
                } else {
                    1.0
                };
                Ok(ClientUpdate {
                    params: zip_map(global, &delta, |g, d| g + scale * d)?,
                    ..update.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let aggregated = self.inner.aggregate(global, &clipped)?;
        self.round += 1;
        let sigma = self.noise_stddev();
        if sigma == 0.0 {
            return Ok(aggregated);
        }
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ self.round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut noisy = ParamMap::new();
        for (name, tensor) in aggregated {
            let values = tensor
                .values()
                .iter()
                .map(|v| {
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (f64::from(*v) + sigma * z) as f32
                })
                .collect();
            noisy.insert(name, HostTensor::new(tensor.shape().to_vec(), values)?);
        }
        Ok(noisy)
    }

    fn state(&self) -> ParamMap {
        let mut state: ParamMap = self
            .inner
            .state()
            .into_iter()
            .map(|(n, t)| (format!("inner.{n}"), t))
            .collect();
        state.insert(
            ROUND_KEY,
            HostTensor::new(vec![1], vec![self.round as f32]).expect("one value"),
        );
        state
    }

    fn load_state(&mut self, state: &ParamMap) -> Result<()> {
        self.round = state_counter(state, ROUND_KEY)?;
        let inner: ParamMap = state
            .iter()
            .filter_map(|(n, t)| n.strip_prefix("inner.").map(|r| (r.to_string(), t.clone())))
            .collect();
        self.inner.load_state(&inner)
    }

    fn reset(&mut self) {
        self.inner.reset();
    }

    fn merges_into_base(&self) -> bool {
        self.inner.merges_into_base()
    }
}
