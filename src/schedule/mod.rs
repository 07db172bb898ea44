//! Stage schedules: how many layers each developmental stage trains, for how many rounds
//! (DESIGN section 1: capacities doubling 4 -> 8 -> 16 -> 32 for a 32-layer model, equal rounds
//! per stage).
//!
//! [`StageScheduler`] plans all stages up front. An adaptive scheduler can also have the
//! clients measure candidate submodels before the first stage ([`ProbeOutcome`]), end a stage
//! early after any round ([`StageProgress`]), and revise the stages still to come after each
//! stage ([`StageOutcome`]); [`AdaptiveScheduler`] does all three.

mod adaptive;
mod explicit;
mod geometric;
mod single;

pub use adaptive::AdaptiveScheduler;
pub use explicit::ExplicitScheduler;
pub use geometric::GeometricScheduler;
pub use single::SingleStage;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One developmental stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Number of (fused) layers the stage's submodel has.
    pub capacity: usize,
    /// Federated rounds the stage runs.
    pub rounds: usize,
}

/// What a finished stage reports to the scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageOutcome {
    /// The stage as it ran.
    pub stage: Stage,
    /// Held-out loss at the end of the stage, if evaluated.
    pub eval_loss: Option<f64>,
    /// Mean training loss over the stage's last round.
    pub train_loss: Option<f64>,
}

/// The current stage's rounds so far, for [`StageScheduler::ends_early`].
#[derive(Debug, Clone, PartialEq)]
pub struct StageProgress<'a> {
    /// Index of the stage in the plan.
    pub index: usize,
    /// The stage as planned.
    pub stage: Stage,
    /// Each of the stage's rounds so far (the one just aggregated last): the clients'
    /// example-weighted training loss on the stage's submodel (`None` when no client
    /// succeeded).
    pub train_losses: &'a [Option<f64>],
}

/// What the clients measured before the first stage, for [`StageScheduler::after_probe`]:
/// the held-out loss of fused submodels before any training, on the clients' own examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    /// `(capacity, loss)` of each probed submodel, in the order they were asked for.
    pub losses: Vec<(usize, f64)>,
    /// The full model's loss on the same examples.
    pub full_loss: f64,
}

/// Plans developmental stages.
///
/// # Example
///
/// A scheduler that runs one warm-up stage at a quarter of the layers, then the full model:
///
/// ```
/// use devft::schedule::{Stage, StageScheduler, validate_plan};
///
/// struct QuarterThenFull;
///
/// impl StageScheduler for QuarterThenFull {
///     fn plan(&self, num_layers: usize, total_rounds: usize) -> devft::Result<Vec<Stage>> {
///         let warm = total_rounds / 2;
///         let plan = vec![
///             Stage { capacity: (num_layers / 4).max(1), rounds: warm },
///             Stage { capacity: num_layers, rounds: total_rounds - warm },
///         ];
///         validate_plan(&plan, num_layers, total_rounds)?;
///         Ok(plan)
///     }
/// }
///
/// let plan = QuarterThenFull.plan(32, 10)?;
/// assert_eq!(plan[0], Stage { capacity: 8, rounds: 5 });
/// # Ok::<(), devft::Error>(())
/// ```
pub trait StageScheduler: Send {
    /// The stages for a model of `num_layers` layers and a budget of `total_rounds` rounds:
    /// capacities non-decreasing, the last equal to `num_layers`, every stage at least one
    /// round, rounds adding up to `total_rounds`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when no valid plan exists (e.g. more stages than rounds).
    fn plan(&self, num_layers: usize, total_rounds: usize) -> Result<Vec<Stage>>;

    /// Called after each stage with everything finished so far; returns the stages still to
    /// run. The default keeps the plan.
    fn revise(&self, _finished: &[StageOutcome], remaining: Vec<Stage>) -> Vec<Stage> {
        remaining
    }

    /// Capacities whose fused submodels the clients evaluate (forward passes on a few of
    /// their examples) before the first stage; the full model is always evaluated with them.
    /// Empty (the default): no probe.
    fn probe_capacities(&self, _num_layers: usize) -> Vec<usize> {
        Vec::new()
    }

    /// The plan to run after the probe asked for by [`Self::probe_capacities`]; it must keep
    /// the [`Self::plan`] contract for the same layers and rounds. The default keeps `plan`.
    fn after_probe(&self, _probe: &ProbeOutcome, plan: Vec<Stage>) -> Vec<Stage> {
        plan
    }

    /// Called after each aggregated round of a stage that is not the last: `true` ends the
    /// stage now, before its planned rounds are spent; its unspent rounds go to the next
    /// stage (and [`Self::revise`] may move them). The default never ends a stage early.
    fn ends_early(&self, _progress: &StageProgress<'_>) -> bool {
        false
    }
}

/// Checks a plan against the [`StageScheduler::plan`] contract.
///
/// # Errors
///
/// [`Error::InvalidArgument`] naming the broken rule.
pub fn validate_plan(plan: &[Stage], num_layers: usize, total_rounds: usize) -> Result<()> {
    let invalid = |msg: String| Err(Error::InvalidArgument(msg));
    let Some(last) = plan.last() else {
        return invalid("a plan needs at least one stage".into());
    };
    if last.capacity != num_layers {
        return invalid(format!(
            "the last stage must train all {num_layers} layers, not {}",
            last.capacity
        ));
    }
    for (i, stage) in plan.iter().enumerate() {
        if stage.capacity == 0 || stage.capacity > num_layers {
            return invalid(format!(
                "stage {i} has capacity {} (need 1..={num_layers})",
                stage.capacity
            ));
        }
        if stage.rounds == 0 {
            return invalid(format!("stage {i} has no rounds"));
        }
        if i > 0 && stage.capacity < plan[i - 1].capacity {
            return invalid(format!("stage {i} shrinks the submodel"));
        }
    }
    let rounds: usize = plan.iter().map(|s| s.rounds).sum();
    if rounds != total_rounds {
        return invalid(format!(
            "stages use {rounds} rounds, the budget is {total_rounds}"
        ));
    }
    Ok(())
}

/// Splits `total` rounds over `stages` stages as equally as possible, remainder to the last
/// stages (the larger submodels).
///
/// # Errors
///
/// [`Error::InvalidArgument`] when there are more stages than rounds.
pub(crate) fn split_rounds(total: usize, stages: usize) -> Result<Vec<usize>> {
    if stages > total {
        return Err(Error::InvalidArgument(format!(
            "{stages} stages need at least {stages} rounds, the budget is {total}"
        )));
    }
    let base = total / stages;
    let extra = total % stages;
    Ok((0..stages)
        .map(|i| base + usize::from(i >= stages - extra))
        .collect())
}
