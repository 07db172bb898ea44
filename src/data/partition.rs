//! Splitting a data set among clients: IID, or non-IID with per-label Dirichlet proportions.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Shuffles `0..num_examples` with `seed` and deals it round-robin to `num_clients` clients.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when there are no clients or fewer examples than clients.
pub fn partition_iid(
    num_examples: usize,
    num_clients: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    check(num_examples, num_clients)?;
    let mut order: Vec<usize> = (0..num_examples).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut clients = vec![Vec::new(); num_clients];
    for (i, example) in order.into_iter().enumerate() {
        clients[i % num_clients].push(example);
    }
    Ok(clients)
}

/// Non-IID split: for each label, client shares are drawn from `Dirichlet(alpha, ..., alpha)`
/// and that label's examples are dealt accordingly (small `alpha`: each client sees few
/// labels; large `alpha`: close to IID). Clients left empty then take one example from the
/// largest client, so every client has data.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when `alpha` is not positive and finite, or there are fewer
/// examples than clients.
pub fn partition_dirichlet(
    labels: &[usize],
    num_clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    check(labels.len(), num_clients)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "Dirichlet alpha must be positive, got {alpha}"
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut clients = vec![Vec::new(); num_clients];
    let num_labels = labels.iter().max().map_or(0, |m| m + 1);
    for label in 0..num_labels {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == label).collect();
        members.shuffle(&mut rng);
        let weights: Vec<f64> = (0..num_clients).map(|_| gamma(alpha, &mut rng)).collect();
        let total: f64 = weights.iter().sum();
        let mut cumulative = 0.0;
        let mut start = 0;
        for (client, w) in weights.iter().enumerate() {
            cumulative += w / total;
            let end = if client + 1 == num_clients {
                members.len()
            } else {
                ((cumulative * members.len() as f64).round() as usize).clamp(start, members.len())
            };
            clients[client].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    while let Some(empty) = clients.iter().position(Vec::is_empty) {
        let largest = (0..num_clients)
            .max_by_key(|&c| clients[c].len())
            .expect("clients exist");
        let moved = clients[largest]
            .pop()
            .expect("the largest client has more than one example");
        clients[empty].push(moved);
    }
    for client in &mut clients {
        client.sort_unstable();
    }
    Ok(clients)
}

fn check(num_examples: usize, num_clients: usize) -> Result<()> {
    if num_clients == 0 {
        return Err(Error::InvalidArgument("need at least one client".into()));
    }
    if num_examples < num_clients {
        return Err(Error::InvalidArgument(format!(
            "{num_examples} examples cannot give each of {num_clients} clients one"
        )));
    }
    Ok(())
}

/// A `Gamma(shape, 1)` draw (Marsaglia and Tsang; shapes below 1 via the boost
/// `Gamma(a) = Gamma(a + 1) * U^(1/a)`).
fn gamma(shape: f64, rng: &mut StdRng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_has_the_right_mean() {
        let mut rng = StdRng::seed_from_u64(1);
        for shape in [0.3, 1.0, 4.0] {
            let mean = (0..20_000).map(|_| gamma(shape, &mut rng)).sum::<f64>() / 20_000.0;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "shape {shape}: mean {mean}"
            );
        }
    }
}
