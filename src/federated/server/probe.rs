//! The probe before the first stage: clients evaluate the fused submodels of the capacities
//! the scheduler asks for ([`crate::schedule::StageScheduler::probe_capacities`]), and the
//! scheduler plans from their losses.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;

use super::{ClientTask, ProbeCost, Server, mix};
use crate::error::{Error, Result};
use crate::federated::metrics::{LedgerEntry, WireSize};
use crate::federated::protocol::{Message, ProbeReply, ProbeTask};
use crate::federated::stage_model::adapter_sha256;
use crate::grouping::Grouping;
use crate::schedule::{ProbeOutcome, validate_plan};

/// The largest probe reply the server reads: a few numbers in a JSON header.
const MAX_PROBE_REPLY: usize = 1 << 16;

impl Server {
    /// The probe's tasks for the clients sampled for it, when the scheduler asks for a probe
    /// and the run has not started; `None` otherwise. Answer each with
    /// [`crate::federated::Client::probe`] and pass the replies to
    /// [`Server::aggregate_probe`] before the first round.
    ///
    /// # Errors
    ///
    /// The errors of grouping and encoding.
    pub fn configure_probe(&mut self) -> Result<Option<Vec<ClientTask>>> {
        let num_layers = self.base.num_layers();
        let capacities = self.strategy.scheduler.probe_capacities(num_layers);
        if capacities.is_empty()
            || self.state.rounds_done > 0
            || self.pending.is_some()
            || self.probe_sent.is_some()
            || self.state.probe.is_some()
        {
            return Ok(None);
        }
        let started = Instant::now();
        let mut candidates = capacities
            .iter()
            .filter(|&&k| k >= 1 && k < num_layers)
            .map(|&k| self.strategy.grouper.group(&self.base, k))
            .collect::<Result<Vec<Grouping>>>()?;
        candidates.push(Grouping::singletons(num_layers));
        let task = ProbeTask {
            candidates,
            fuser: self.strategy.fuser.describe(),
            start_sha256: adapter_sha256(&self.base.lora_params())?,
            max_examples: self.config.probe_examples,
            batch_size: self.config.eval_batch_size,
            pad_id: self.config.local.pad_id,
        };
        let bytes = task.to_bytes()?;
        let mut rng = StdRng::seed_from_u64(mix(self.config.seed, u64::MAX));
        let mut sampled = sample(
            &mut rng,
            self.state.num_clients,
            self.config.clients_per_round,
        )
        .into_vec();
        sampled.sort_unstable();
        let mut cost = ProbeCost {
            seconds: 0.0,
            ..ProbeCost::default()
        };
        let tasks = sampled
            .iter()
            .map(|&client| {
                let down = WireSize {
                    payload: 0,
                    total: bytes.len() as u64,
                };
                cost.down.total += down.total;
                self.state.ledger.entries.push(LedgerEntry {
                    round: 0,
                    client,
                    up: WireSize::default(),
                    down,
                    setup: WireSize::default(),
                    evaluation: true,
                });
                ClientTask {
                    client,
                    setup: None,
                    task: bytes.clone(),
                    max_reply_bytes: MAX_PROBE_REPLY,
                }
            })
            .collect();
        cost.seconds = started.elapsed().as_secs_f64();
        self.probe_sent = Some((task.candidates, cost, Instant::now()));
        Ok(Some(tasks))
    }

    /// Takes the probe's replies (`(client, Ok(bytes))` or why there is none): the
    /// target-weighted mean loss of each candidate over the valid replies, which the scheduler
    /// turns into the plan ([`crate::schedule::StageScheduler::after_probe`]). A bad reply is
    /// logged and skipped; with no valid reply the plan stays as it was and `None` is
    /// returned. The decision is in the first round's metrics (`schedule`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when no probe was configured, or when the scheduler's plan
    /// breaks the plan contract.
    pub fn aggregate_probe(
        &mut self,
        replies: Vec<(usize, std::result::Result<Vec<u8>, String>)>,
    ) -> Result<Option<ProbeOutcome>> {
        let (candidates, mut cost, sent_at) = self
            .probe_sent
            .take()
            .ok_or_else(|| Error::InvalidArgument("no probe is waiting for replies".into()))?;
        let mut totals = vec![0.0; candidates.len()];
        let mut targets = 0usize;
        for (client, reply) in replies {
            let Some(entry) = self
                .state
                .ledger
                .entries
                .iter_mut()
                .find(|e| e.round == 0 && e.client == client && e.up.total == 0)
            else {
                eprintln!("probe: ignoring a reply from client {client}, which was not asked");
                continue;
            };
            let checked = reply.and_then(|bytes| {
                let sender = format!("client {client}");
                let reply = ProbeReply::from_bytes(&bytes, MAX_PROBE_REPLY, &sender)
                    .map_err(|e| e.to_string())?;
                if reply.client != client {
                    return Err(format!("{sender} answered for another client"));
                }
                if reply.losses.len() != candidates.len()
                    || reply.losses.iter().any(|l| !l.is_finite() || *l < 0.0)
                    || reply.num_targets == 0
                {
                    return Err(format!(
                        "{sender} sent {} losses over {} targets for {} candidates",
                        reply.losses.len(),
                        reply.num_targets,
                        candidates.len()
                    ));
                }
                Ok((reply, bytes.len()))
            });
            match checked {
                Ok((reply, len)) => {
                    entry.up.total = len as u64;
                    cost.up.total += len as u64;
                    for (total, loss) in totals.iter_mut().zip(&reply.losses) {
                        *total += loss * reply.num_targets as f64;
                    }
                    targets += reply.num_targets;
                }
                Err(reason) => eprintln!("probe: client {client} failed: {reason}"),
            }
        }
        cost.seconds += sent_at.elapsed().as_secs_f64();
        self.probe_cost = Some(cost);
        if targets == 0 {
            self.schedule_note = Some("probe: no valid reply; the plan is unchanged".into());
            return Ok(None);
        }
        let mean: Vec<f64> = totals.iter().map(|t| t / targets as f64).collect();
        let outcome = ProbeOutcome {
            losses: candidates[..candidates.len() - 1]
                .iter()
                .zip(&mean)
                .map(|(grouping, &loss)| (grouping.len(), loss))
                .collect(),
            full_loss: mean[mean.len() - 1],
        };
        let plan = self
            .strategy
            .scheduler
            .after_probe(&outcome, self.state.plan.clone());
        validate_plan(&plan, self.base.num_layers(), self.config.rounds)?;
        self.schedule_note = Some(format!(
            "probe: full model {:.4}, {}; plan {}",
            outcome.full_loss,
            outcome
                .losses
                .iter()
                .map(|(k, loss)| format!("K={k} {loss:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            describe_plan(&plan)
        ));
        self.state.plan = plan;
        self.state.probe = Some(outcome.clone());
        Ok(Some(outcome))
    }
}

/// `capacity x rounds` of each stage.
pub(crate) fn describe_plan(plan: &[crate::schedule::Stage]) -> String {
    plan.iter()
        .map(|s| format!("{}x{}", s.capacity, s.rounds))
        .collect::<Vec<_>>()
        .join(", ")
}
