//! A schedule chosen from measurements: the first stage from the clients' probe of candidate
//! submodels, each stage's end from its training loss.

use crate::error::{Error, Result};
use crate::schedule::{ProbeOutcome, Stage, StageProgress, StageScheduler, validate_plan};

/// Starts at the smallest probed submodel whose loss is close to the full model's, grows
/// geometrically from there, and ends a stage early once its training loss stops improving.
///
/// - **First stage.** Before the first round the clients evaluate the fused submodels of
///   `candidates` (fractions of the layers) and the full model on a few of their examples
///   (forward passes only). The first capacity is the smallest candidate whose loss is at most
///   `(1 + tolerance)` times the full model's; when none is, the run trains the full model
///   only. Until the probe, [`StageScheduler::plan`] plans from the largest candidate.
/// - **Growth.** Each later stage has `growth` times the layers of the one before (rounded
///   up), the last all of them.
/// - **Rounds.** The stages before the last share `early_share` of the rounds equally (at
///   least one each); the last stage has the rest.
/// - **Plateau.** A stage before the last ends after a round in which the mean training loss
///   of its last `window` rounds is less than `min_improvement` (relative) below the mean of
///   the `window` rounds before; its unspent rounds go to the next stage.
///
/// ```
/// use devft::schedule::{AdaptiveScheduler, ProbeOutcome, Stage, StageProgress, StageScheduler};
///
/// let scheduler = AdaptiveScheduler::new().with_candidates(vec![0.25, 0.5]);
/// assert_eq!(scheduler.probe_capacities(30), [8, 15]);
/// // The 8-layer submodel is far off, the 15-layer one within 25% of the full model.
/// let probe = ProbeOutcome { losses: vec![(8, 9.0), (15, 3.4)], full_loss: 3.0 };
/// let plan = scheduler.after_probe(&probe, scheduler.plan(30, 16)?);
/// assert_eq!(plan, [Stage { capacity: 15, rounds: 8 }, Stage { capacity: 30, rounds: 8 }]);
/// // Training loss flat over the last two rounds against the two before: move on.
/// let losses = [Some(2.85), Some(2.8), Some(2.81), Some(2.82)];
/// let progress = StageProgress { index: 0, stage: plan[0], train_losses: &losses };
/// assert!(scheduler.ends_early(&progress));
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveScheduler {
    candidates: Vec<f64>,
    tolerance: f64,
    growth: f64,
    early_share: f64,
    window: usize,
    min_improvement: f64,
}

impl Default for AdaptiveScheduler {
    fn default() -> Self {
        Self::new()
    }
}

impl AdaptiveScheduler {
    /// Candidates at 1/8, 1/4, 3/8, 1/2, 5/8 and 3/4 of the layers, tolerance 0.25, growth 2,
    /// early share 0.5, plateau window 2 rounds with a 2% minimum improvement.
    pub fn new() -> Self {
        Self {
            candidates: vec![0.125, 0.25, 0.375, 0.5, 0.625, 0.75],
            tolerance: 0.25,
            growth: 2.0,
            early_share: 0.5,
            window: 2,
            min_improvement: 0.02,
        }
    }

    /// The candidate first stages, as fractions of the layers (each in `(0, 1)`).
    pub fn with_candidates(mut self, fractions: Vec<f64>) -> Self {
        self.candidates = fractions;
        self
    }

    /// How far (relative) above the full model's loss a first stage's submodel may start.
    pub fn with_tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Capacity growth from stage to stage (above 1).
    pub fn with_growth(mut self, growth: f64) -> Self {
        self.growth = growth;
        self
    }

    /// The share of the rounds the stages before the last may use (in `[0, 1)`).
    pub fn with_early_share(mut self, share: f64) -> Self {
        self.early_share = share;
        self
    }

    /// The plateau rule: `window` rounds (0 turns the rule off) against the `window` before,
    /// and the least relative improvement that keeps a stage going.
    pub fn with_plateau(mut self, window: usize, min_improvement: f64) -> Self {
        self.window = window;
        self.min_improvement = min_improvement;
        self
    }

    fn check(&self) -> Result<()> {
        let invalid = |what: String| Err(Error::InvalidArgument(what));
        if self.candidates.is_empty()
            || self
                .candidates
                .iter()
                .any(|f| !(f.is_finite() && *f > 0.0 && *f < 1.0))
        {
            return invalid(format!(
                "adaptive candidates must be fractions in (0, 1), got {:?}",
                self.candidates
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return invalid(format!("tolerance must be >= 0, got {}", self.tolerance));
        }
        if !(self.growth.is_finite() && self.growth > 1.0) {
            return invalid(format!("growth must be above 1, got {}", self.growth));
        }
        if !(self.early_share.is_finite() && (0.0..1.0).contains(&self.early_share)) {
            return invalid(format!(
                "early share must be in [0, 1), got {}",
                self.early_share
            ));
        }
        if !self.min_improvement.is_finite() {
            return invalid("min improvement must be finite".into());
        }
        Ok(())
    }

    /// The stages from `first` layers up to `num_layers` over `total_rounds`, dropping the
    /// smallest early stages when there are more stages than rounds allow.
    fn stages_from(&self, first: usize, num_layers: usize, total_rounds: usize) -> Vec<Stage> {
        let mut capacities = Vec::new();
        let mut capacity = first.clamp(1, num_layers);
        while capacity < num_layers {
            capacities.push(capacity);
            capacity = ((capacity as f64 * self.growth).ceil() as usize).max(capacity + 1);
        }
        let early_rounds = ((total_rounds as f64 * self.early_share).floor() as usize)
            .min(total_rounds.saturating_sub(1));
        let keep = capacities.len().min(early_rounds);
        let capacities = &capacities[capacities.len() - keep..];
        let mut plan: Vec<Stage> = capacities
            .iter()
            .enumerate()
            .map(|(i, &capacity)| Stage {
                capacity,
                rounds: early_rounds / keep + usize::from(i >= keep - early_rounds % keep),
            })
            .collect();
        let used: usize = plan.iter().map(|s| s.rounds).sum();
        plan.push(Stage {
            capacity: num_layers,
            rounds: total_rounds - used,
        });
        plan
    }
}

impl StageScheduler for AdaptiveScheduler {
    fn plan(&self, num_layers: usize, total_rounds: usize) -> Result<Vec<Stage>> {
        self.check()?;
        if num_layers == 0 || total_rounds == 0 {
            return Err(Error::InvalidArgument(
                "a plan needs layers and rounds".into(),
            ));
        }
        let largest = *self
            .probe_capacities(num_layers)
            .last()
            .unwrap_or(&num_layers);
        let plan = self.stages_from(largest, num_layers, total_rounds);
        validate_plan(&plan, num_layers, total_rounds)?;
        Ok(plan)
    }

    fn probe_capacities(&self, num_layers: usize) -> Vec<usize> {
        let mut capacities: Vec<usize> = self
            .candidates
            .iter()
            .map(|f| (f * num_layers as f64).round() as usize)
            .filter(|&k| k >= 1 && k < num_layers)
            .collect();
        capacities.sort_unstable();
        capacities.dedup();
        capacities
    }

    fn after_probe(&self, probe: &ProbeOutcome, plan: Vec<Stage>) -> Vec<Stage> {
        let (Some(last), true) = (plan.last(), probe.full_loss.is_finite()) else {
            return plan;
        };
        let num_layers = last.capacity;
        let total_rounds = plan.iter().map(|s| s.rounds).sum();
        let bound = probe.full_loss * (1.0 + self.tolerance);
        let first = probe
            .losses
            .iter()
            .filter(|(k, loss)| *k < num_layers && loss.is_finite() && *loss <= bound)
            .map(|(k, _)| *k)
            .min()
            .unwrap_or(num_layers);
        self.stages_from(first, num_layers, total_rounds)
    }

    fn ends_early(&self, progress: &StageProgress<'_>) -> bool {
        let w = self.window;
        let losses = progress.train_losses;
        if w == 0 || losses.len() < 2 * w {
            return false;
        }
        let mean = |window: &[Option<f64>]| -> Option<f64> {
            let sum: Option<f64> = window.iter().copied().sum();
            sum.map(|s| s / window.len() as f64)
        };
        let n = losses.len();
        match (mean(&losses[n - 2 * w..n - w]), mean(&losses[n - w..])) {
            (Some(before), Some(recent)) if before > 0.0 => {
                (before - recent) / before < self.min_improvement
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(pairs: &[(usize, usize)]) -> Vec<Stage> {
        pairs
            .iter()
            .map(|&(capacity, rounds)| Stage { capacity, rounds })
            .collect()
    }

    #[test]
    fn probes_fractions_of_the_layers_rounded_below_the_full_model() {
        assert_eq!(
            AdaptiveScheduler::new().probe_capacities(30),
            [4, 8, 11, 15, 19, 23]
        );
        let tiny = AdaptiveScheduler::new().with_candidates(vec![0.1, 0.5, 0.99]);
        assert_eq!(tiny.probe_capacities(4), [2]);
    }

    #[test]
    fn the_first_stage_is_the_smallest_candidate_within_tolerance() {
        let scheduler = AdaptiveScheduler::new().with_tolerance(0.1);
        let plan = scheduler.plan(30, 16).unwrap();
        assert_eq!(plan, stages(&[(23, 8), (30, 8)]));
        let probe = |losses: &[(usize, f64)]| ProbeOutcome {
            losses: losses.to_vec(),
            full_loss: 2.0,
        };
        // 8 is the smallest within 10% (2.2); 4 is not, 15 is but is larger.
        let chosen = scheduler.after_probe(
            &probe(&[(4, 30.0), (8, 2.19), (11, 2.5), (15, 2.05)]),
            plan.clone(),
        );
        assert_eq!(chosen, stages(&[(8, 4), (16, 4), (30, 8)]));
        // None within: the full model only.
        let none = scheduler.after_probe(&probe(&[(4, 30.0), (8, 9.0)]), plan.clone());
        assert_eq!(none, stages(&[(30, 16)]));
        // A probe that measured nothing usable keeps the plan.
        let broken = ProbeOutcome {
            losses: vec![(8, 2.0)],
            full_loss: f64::NAN,
        };
        assert_eq!(scheduler.after_probe(&broken, plan.clone()), plan);
    }

    #[test]
    fn early_rounds_are_shared_and_stages_dropped_when_rounds_are_few() {
        let scheduler = AdaptiveScheduler::new();
        // 4 -> 8 -> 16 -> 30 over 16 rounds: 8 early rounds over 3 stages, the rest last.
        assert_eq!(
            scheduler.stages_from(4, 30, 16),
            stages(&[(4, 2), (8, 3), (16, 3), (30, 8)])
        );
        // 3 rounds: one early round, kept for the largest early stage.
        assert_eq!(scheduler.stages_from(1, 30, 3), stages(&[(16, 1), (30, 2)]));
        // One round: the full model.
        assert_eq!(scheduler.stages_from(4, 30, 1), stages(&[(30, 1)]));
        for (first, rounds) in [(1, 2), (3, 7), (29, 5), (30, 9)] {
            let plan = scheduler.stages_from(first, 30, rounds);
            validate_plan(&plan, 30, rounds).unwrap();
        }
    }

    #[test]
    fn a_stage_ends_when_its_training_loss_plateaus() {
        let scheduler = AdaptiveScheduler::new().with_plateau(2, 0.05);
        let ends = |losses: &[Option<f64>]| {
            scheduler.ends_early(&StageProgress {
                index: 0,
                stage: Stage {
                    capacity: 4,
                    rounds: 8,
                },
                train_losses: losses,
            })
        };
        assert!(!ends(&[Some(5.0), Some(5.0), Some(5.0)]), "too few rounds");
        // (5.0 + 4.6) / 2 = 4.8 -> (4.2 + 4.0) / 2 = 4.1: 14.6% better.
        assert!(!ends(&[Some(5.0), Some(4.6), Some(4.2), Some(4.0)]));
        // 4.1 -> 4.0: 2.4% better, under 5%.
        assert!(ends(&[
            Some(9.0),
            Some(4.2),
            Some(4.0),
            Some(4.1),
            Some(3.9)
        ]));
        // A round without a loss decides nothing.
        assert!(!ends(&[Some(4.0), Some(4.0), None, Some(4.0)]));
        let off = AdaptiveScheduler::new().with_plateau(0, 0.05);
        assert!(!off.ends_early(&StageProgress {
            index: 0,
            stage: Stage {
                capacity: 4,
                rounds: 8
            },
            train_losses: &[Some(1.0); 6],
        }));
    }

    #[test]
    fn invalid_settings_are_refused_when_planning() {
        for scheduler in [
            AdaptiveScheduler::new().with_candidates(vec![]),
            AdaptiveScheduler::new().with_candidates(vec![1.0]),
            AdaptiveScheduler::new().with_tolerance(-0.1),
            AdaptiveScheduler::new().with_growth(1.0),
            AdaptiveScheduler::new().with_early_share(1.0),
            AdaptiveScheduler::new().with_plateau(2, f64::NAN),
        ] {
            assert!(matches!(
                scheduler.plan(30, 16),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
