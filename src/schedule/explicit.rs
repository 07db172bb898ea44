//! A schedule given stage by stage.

use crate::error::{Error, Result};
use crate::schedule::{Stage, StageScheduler, split_rounds, validate_plan};

/// Explicit capacities, with explicit rounds per stage or the budget split equally.
///
/// ```
/// use devft::schedule::{ExplicitScheduler, Stage, StageScheduler};
///
/// let plan = ExplicitScheduler::capacities(vec![2, 4, 8]).plan(8, 7)?;
/// assert_eq!(plan, [
///     Stage { capacity: 2, rounds: 2 },
///     Stage { capacity: 4, rounds: 2 },
///     Stage { capacity: 8, rounds: 3 },
/// ]);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ExplicitScheduler {
    capacities: Vec<usize>,
    rounds: Option<Vec<usize>>,
}

impl ExplicitScheduler {
    /// These capacities; the round budget is split equally (remainder to later stages).
    pub fn capacities(capacities: Vec<usize>) -> Self {
        Self {
            capacities,
            rounds: None,
        }
    }

    /// These exact stages; their rounds must add up to the budget passed to `plan`.
    pub fn stages(stages: &[Stage]) -> Self {
        Self {
            capacities: stages.iter().map(|s| s.capacity).collect(),
            rounds: Some(stages.iter().map(|s| s.rounds).collect()),
        }
    }
}

impl StageScheduler for ExplicitScheduler {
    fn plan(&self, num_layers: usize, total_rounds: usize) -> Result<Vec<Stage>> {
        if self.capacities.is_empty() {
            return Err(Error::InvalidArgument(
                "an explicit schedule needs stages".into(),
            ));
        }
        let rounds = match &self.rounds {
            Some(rounds) => rounds.clone(),
            None => split_rounds(total_rounds, self.capacities.len())?,
        };
        let plan: Vec<Stage> = self
            .capacities
            .iter()
            .zip(rounds)
            .map(|(&capacity, rounds)| Stage { capacity, rounds })
            .collect();
        validate_plan(&plan, num_layers, total_rounds)?;
        Ok(plan)
    }
}
