//! The layer-similarity graph of deconfliction-guided grouping, computed by streaming.
//!
//! For layer vectors `v_l` (the seven effective projection weights of layer l concatenated,
//! q, k, v, o, gate, up, down), `cos_ij = <v_i, v_j> / (|v_i| |v_j|)`, the similarity is
//! `W_ij = max(cos_ij, 0)` for `i != j` with `W_ii = 0`, and the unnormalised Laplacian is
//! `L = D - W`, `D = diag(row sums of W)`.
//!
//! `<v_i, v_j>` is a sum over projections, so the Gram matrix is accumulated one projection at
//! a time: memory holds that projection's tensor for each layer, never a concatenated vector.

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::grouping::LayerSource;
use crate::model::Projection;
use crate::params::HostTensor;

/// The similarity graph of a model's layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSimilarity {
    /// Raw cosine similarities `cos_ij` (diagonal 1).
    pub cosine: Vec<Vec<f64>>,
    /// `W`: cosines with negatives clipped to 0 and a zero diagonal.
    pub similarity: Vec<Vec<f64>>,
    /// `D`: the row sums of `W`.
    pub degree: Vec<f64>,
    /// `L = D - W`.
    pub laplacian: Vec<Vec<f64>>,
    /// `|v_l|` for each layer.
    pub norms: Vec<f64>,
}

/// Elements per block of the blocked Gram accumulation: the block of every layer stays in
/// cache while all pairs are formed.
const BLOCK: usize = 4096;

/// `<a, b>` over one block: f32 products in eight independent lanes (which the compiler
/// vectorises), summed in f64.
fn block_dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 8];
    let mut chunks_a = a.chunks_exact(8);
    let mut chunks_b = b.chunks_exact(8);
    for (x, y) in (&mut chunks_a).zip(&mut chunks_b) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail)
}

/// Adds `<t_i, t_j>` for every pair of `tensors` (all of one length) to `gram` (row-major
/// `n x n`), block by block in parallel.
fn accumulate_gram(tensors: &[HostTensor], gram: &mut [f64]) {
    let n = tensors.len();
    let len = tensors[0].len();
    let partial = (0..len.div_ceil(BLOCK))
        .into_par_iter()
        .fold(
            || vec![0.0f64; n * n],
            |mut acc, block| {
                let range = block * BLOCK..((block + 1) * BLOCK).min(len);
                for i in 0..n {
                    let a = &tensors[i].values()[range.clone()];
                    for j in i..n {
                        acc[i * n + j] += block_dot(a, &tensors[j].values()[range.clone()]);
                    }
                }
                acc
            },
        )
        .reduce(
            || vec![0.0f64; n * n],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    for i in 0..n {
        for j in i..n {
            gram[i * n + j] += partial[i * n + j];
            if i != j {
                gram[j * n + i] += partial[i * n + j];
            }
        }
    }
}

/// Computes the similarity graph of every layer of `layers`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when a projection's shape differs between layers,
/// [`Error::NonFinite`] when a weight holds NaN or infinity, [`Error::InvalidArgument`] when a
/// layer's vector is zero (its cosine is undefined), and any error of the source.
pub fn layer_similarity(layers: &dyn LayerSource) -> Result<LayerSimilarity> {
    let n = layers.num_layers();
    let mut gram = vec![0.0f64; n * n];
    for projection in Projection::ALL {
        let tensors = (0..n)
            .map(|l| layers.effective_weight(l, projection))
            .collect::<Result<Vec<_>>>()?;
        for (l, tensor) in tensors.iter().enumerate() {
            if tensor.shape() != tensors[0].shape() {
                return Err(Error::ShapeMismatch {
                    name: format!("layers.{l}.{}.weight", projection.path()),
                    expected: tensors[0].shape().to_vec(),
                    found: tensor.shape().to_vec(),
                });
            }
            if !tensor.is_finite() {
                return Err(Error::NonFinite {
                    name: format!("layers.{l}.{}.weight", projection.path()),
                });
            }
        }
        accumulate_gram(&tensors, &mut gram);
    }
    let gram: Vec<Vec<f64>> = gram.chunks(n).map(<[f64]>::to_vec).collect();
    let norms: Vec<f64> = (0..n).map(|i| gram[i][i].sqrt()).collect();
    if let Some(zero) = norms.iter().position(|&v| v == 0.0) {
        return Err(Error::InvalidArgument(format!(
            "layer {zero} has all-zero weights; its similarity is undefined"
        )));
    }
    let cosine: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| gram[i][j] / (norms[i] * norms[j])).collect())
        .collect();
    let similarity: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| if i == j { 0.0 } else { cosine[i][j].max(0.0) })
                .collect()
        })
        .collect();
    let degree: Vec<f64> = similarity.iter().map(|row| row.iter().sum()).collect();
    let laplacian = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| if i == j { degree[i] } else { -similarity[i][j] })
                .collect()
        })
        .collect();
    Ok(LayerSimilarity {
        cosine,
        similarity,
        degree,
        laplacian,
        norms,
    })
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations.
///
/// Returns the eigenvalues in ascending order and the matching unit eigenvectors as columns
/// (`vectors[row][column]`), each column's sign fixed so that its first component with
/// `|x| >= 1e-3 max|x|` is positive. Accurate to machine precision for the small matrices of
/// layer graphs (tens to a few hundred layers).
pub fn symmetric_eigen(matrix: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = matrix.len();
    let mut a: Vec<Vec<f64>> = matrix.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let scale: f64 = a
        .iter()
        .flatten()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut().chain(v.iter_mut()) {
                    let (xp, xq) = (row[p], row[q]);
                    row[p] = c * xp - s * xq;
                    row[q] = s * xp + c * xq;
                }
                let (head, tail) = a.split_at_mut(q);
                for (xp, xq) in head[p].iter_mut().zip(tail[0].iter_mut()) {
                    let (x, y) = (*xp, *xq);
                    *xp = c * x - s * y;
                    *xq = s * x + c * y;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let values = order.iter().map(|&i| a[i][i]).collect();
    let mut vectors = vec![vec![0.0; n]; n];
    for (column, &source) in order.iter().enumerate() {
        let max = (0..n).map(|r| v[r][source].abs()).fold(0.0, f64::max);
        let first = (0..n)
            .find(|&r| v[r][source].abs() >= 1e-3 * max)
            .unwrap_or(0);
        let sign = if v[first][source] < 0.0 { -1.0 } else { 1.0 };
        for (r, row) in vectors.iter_mut().enumerate() {
            row[column] = sign * v[r][source];
        }
    }
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_reconstructs_the_matrix() {
        let m = vec![
            vec![4.0, 1.0, -2.0, 0.5],
            vec![1.0, 3.0, 0.0, 0.25],
            vec![-2.0, 0.0, 5.0, 1.0],
            vec![0.5, 0.25, 1.0, 2.0],
        ];
        let (values, vectors) = symmetric_eigen(&m);
        assert!(values.windows(2).all(|w| w[0] <= w[1]));
        for i in 0..4 {
            for j in 0..4 {
                let rebuilt: f64 = (0..4)
                    .map(|k| vectors[i][k] * values[k] * vectors[j][k])
                    .sum();
                assert!((rebuilt - m[i][j]).abs() < 1e-12, "({i},{j})");
            }
        }
        let trace: f64 = values.iter().sum();
        assert!((trace - 14.0).abs() < 1e-12);
    }
}
