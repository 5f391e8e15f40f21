//! Tabular softmax policies stored as log-probabilities, one row per prompt.

/// `policy[x][y] = log pi(y | x)`, each row normalized (log-sum-exp = 0).
pub type LogPolicy = Vec<Vec<f64>>;

/// `ln(sum_i exp(row_i))`, stable for any finite row.
pub fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
}

/// Shifts a row of log-weights so that it is a normalized log-probability row.
pub fn normalize(row: &mut [f64]) {
    let z = logsumexp(row);
    for v in row.iter_mut() {
        *v -= z;
    }
}

/// Normalizes every row of a table of log-weights.
pub fn normalized(mut table: LogPolicy) -> LogPolicy {
    for row in table.iter_mut() {
        normalize(row);
    }
    table
}

/// Probabilities of a normalized log-probability row.
pub fn probs(row: &[f64]) -> Vec<f64> {
    row.iter().map(|&v| v.exp()).collect()
}

/// The uniform policy for the given number of responses per prompt.
pub fn uniform(shape: &[usize]) -> LogPolicy {
    shape.iter().map(|&r| vec![-(r as f64).ln(); r]).collect()
}

/// APO's extrapolation step between two trained policies:
/// `pi_t ∝ pi_hat_t * (pi_hat_t / pi_hat_t-1)^alpha`, normalized.
/// With `alpha = 0` this returns `pi_hat_t` (renormalized, a no-op up to rounding).
pub fn extrapolate(hat_new: &LogPolicy, hat_old: &LogPolicy, alpha: f64) -> LogPolicy {
    let table = hat_new
        .iter()
        .zip(hat_old)
        .map(|(new, old)| new.iter().zip(old).map(|(&n, &o)| n + alpha * (n - o)).collect())
        .collect();
    normalized(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_makes_probabilities_sum_to_one() {
        let mut row = vec![1000.0, 999.0, -5.0];
        normalize(&mut row);
        let s: f64 = probs(&row).iter().sum();
        assert!((s - 1.0).abs() < 1e-12, "{s}"); // ulp(1000) ~ 1e-13
    }

    #[test]
    fn extrapolation_with_zero_alpha_is_identity() {
        let a = normalized(vec![vec![0.3, -1.0, 2.0]]);
        let b = normalized(vec![vec![0.0, 0.0, 0.0]]);
        let e = extrapolate(&a, &b, 0.0);
        for (x, y) in e[0].iter().zip(&a[0]) {
            assert!((x - y).abs() < 1e-15);
        }
    }
}
