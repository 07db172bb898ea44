//! Geometric growth of the submodel: the paper's default schedule.

use crate::error::{Error, Result};
use crate::schedule::{Stage, StageScheduler, split_rounds, validate_plan};

/// Capacities `start, start * growth, start * growth^2, ...`, capped at and ending with the
/// number of layers; rounds split equally (remainder to the later stages). Default: start 4,
/// growth 2 (4 -> 8 -> 16 -> 32 for 32 layers; 4 -> 8 -> 16 -> 30 for 30).
///
/// ```
/// use devft::schedule::{GeometricScheduler, Stage, StageScheduler};
///
/// let plan = GeometricScheduler::default().plan(30, 40)?;
/// let capacities: Vec<usize> = plan.iter().map(|s| s.capacity).collect();
/// assert_eq!(capacities, [4, 8, 16, 30]);
/// assert!(plan.iter().all(|s| s.rounds == 10));
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeometricScheduler {
    start: usize,
    growth: f64,
}

impl Default for GeometricScheduler {
    fn default() -> Self {
        Self {
            start: 4,
            growth: 2.0,
        }
    }
}

impl GeometricScheduler {
    /// Starts at `start` layers and multiplies by `growth` each stage.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `start` is 0 or `growth` is not a finite number > 1.
    pub fn new(start: usize, growth: f64) -> Result<Self> {
        if start == 0 {
            return Err(Error::InvalidArgument(
                "the first stage needs at least one layer".into(),
            ));
        }
        if !growth.is_finite() || growth <= 1.0 {
            return Err(Error::InvalidArgument(format!(
                "growth must be finite and greater than 1, got {growth}"
            )));
        }
        Ok(Self { start, growth })
    }

    /// The capacities for `num_layers` layers.
    pub fn capacities(&self, num_layers: usize) -> Vec<usize> {
        let mut capacities = Vec::new();
        let mut capacity = self.start as f64;
        while (capacity.round() as usize) < num_layers {
            let c = capacity.round() as usize;
            if capacities.last() != Some(&c) {
                capacities.push(c);
            }
            capacity *= self.growth;
        }
        capacities.push(num_layers);
        capacities
    }
}

impl StageScheduler for GeometricScheduler {
    fn plan(&self, num_layers: usize, total_rounds: usize) -> Result<Vec<Stage>> {
        if num_layers == 0 {
            return Err(Error::InvalidArgument("the model has no layers".into()));
        }
        let capacities = self.capacities(num_layers);
        let rounds = split_rounds(total_rounds, capacities.len())?;
        let plan: Vec<Stage> = capacities
            .into_iter()
            .zip(rounds)
            .map(|(capacity, rounds)| Stage { capacity, rounds })
            .collect();
        validate_plan(&plan, num_layers, total_rounds)?;
        Ok(plan)
    }
}
