//! The `prefopt simulate` config: one TOML file, every key optional, unknown keys rejected.
//!
//! Defaults live in one place, [`Config::default`]; the built-in default *run*
//! ([`DEFAULT_CONFIG_TOML`], what `prefopt simulate` does without `--config`) is a TOML
//! text parsed with the same code, so what `--print-config` shows is what runs.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::restart::AlphaSchedule;

/// Which iterations a sweep runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Infinite data: every proximal step in closed form.
    Exact,
    /// Finite data: N prompts, K samples each, labels from the true preference model,
    /// the empirical loss minimized to `tolerance`.
    Sampled,
    /// Both of the above in one sweep (the exact runs are the N = infinity reference).
    Both,
}

impl Mode {
    /// Whether the sweep includes exact-mode runs.
    pub fn runs_exact(self) -> bool {
        matches!(self, Mode::Exact | Mode::Both)
    }
    /// Whether the sweep includes sampled-mode runs.
    pub fn runs_sampled(self) -> bool {
        matches!(self, Mode::Sampled | Mode::Both)
    }
}

/// The preference loss minimized in each iteration (methods.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// DPO: `-logsig(beta * h)`.
    Dpo,
    /// IPO: `(h - 1/(2 beta))^2` (no length normalization: a tabular response has length 1).
    Ipo,
    /// SPPO (soft): squared loss of the log-ratio against `(p_hat - 1/2) / beta`.
    Sppo,
}

impl Loss {
    /// The name used in configs and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::Dpo => "dpo",
            Loss::Ipo => "ipo",
            Loss::Sppo => "sppo",
        }
    }
}

/// How the K samples of a prompt become DPO/IPO pairs in sampled mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// Every pair of distinct responses among the K samples, each with its own label.
    All,
    /// The paper's pipeline: a round robin of labels ranks the K samples; one pair
    /// (most wins, fewest wins) per prompt; prompts whose samples all tie are skipped.
    BestWorst,
}

/// Which preference model to draw when neither `rewards` nor `preferences` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceModel {
    /// Bradley-Terry: rewards drawn i.i.d. uniform on [0, 1).
    Bt,
    /// General: `P(i > j)` drawn i.i.d. uniform on [0, 1) for i < j (usually non-transitive).
    General,
}

/// The initial policy `pi_0`.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Uniform over each prompt's responses.
    Uniform,
    /// Explicit log-probabilities (or unnormalized log-weights), one row per prompt;
    /// each row is normalized with log-sum-exp.
    LogProbs(Vec<Vec<f64>>),
}

impl Serialize for Init {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Init::Uniform => serializer.serialize_str("uniform"),
            Init::LogProbs(rows) => rows.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Init {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InitVisitor;
        impl<'de> Visitor<'de> for InitVisitor {
            type Value = Init;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"uniform\" or an array of arrays of log-probabilities (one per prompt)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Init, E> {
                if v == "uniform" {
                    Ok(Init::Uniform)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Init, A::Error> {
                let mut rows = Vec::new();
                while let Some(row) = seq.next_element::<Vec<f64>>()? {
                    rows.push(row);
                }
                Ok(Init::LogProbs(rows))
            }
        }
        deserializer.deserialize_any(InitVisitor)
    }
}

/// A `prefopt simulate` sweep. Every key is optional; the default of each is given
/// in parentheses and lives in [`Config::default`].
///
/// Shapes: the number of prompts and of responses per prompt come from the first
/// explicit table among `rewards`, `preferences`, `init` (rows may differ in length);
/// otherwise from `num_prompts` x `num_responses`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `exact`, `sampled` or `both` (default `both`).
    pub mode: Mode,
    /// `dpo`, `ipo` or `sppo` (default `dpo`). `dpo` in exact mode needs Bradley-Terry rewards.
    pub loss: Loss,
    /// Extrapolation coefficients swept, each in [0, 1) (default `[0.0, 0.2, 0.4, 0.6, 0.8, 0.9]`).
    pub alphas: Vec<f64>,
    /// How each alpha is applied, swept: `constant` (the paper) and/or the adaptive rules
    /// `restart` and `monotone` (our design, [`crate::restart`]); default `["constant"]`.
    /// Adaptive runs are made for the alphas above 0 (at 0 they coincide with constant) and
    /// compared in summary.json's `adaptive`.
    pub alpha_schedules: Vec<AlphaSchedule>,
    /// KL coefficients swept, each > 0 (default `[1.0]`). SPPO uses `eta = 1 / beta`.
    pub betas: Vec<f64>,
    /// Sampled mode: prompts drawn per iteration (with replacement), each >= 1 (default `[16, 64, 1024]`).
    pub ns: Vec<usize>,
    /// Sampled mode: seeds of the data draws; metrics are reported per seed and
    /// summarized as mean and spread over seeds (default `0..29`).
    pub seeds: Vec<u64>,
    /// Iterations per run, >= 1 (default `30`). Iteration 0 is the initial policy.
    pub iterations: usize,
    /// Number of prompts when no table is given (default `16`).
    pub num_prompts: Option<usize>,
    /// Responses per prompt when no table is given, >= 2 (default `4`).
    pub num_responses: Option<usize>,
    /// Bradley-Terry reward table, one row per prompt: `P(y > y') = sigmoid(r(y) - r(y'))`
    /// (default: absent; then drawn from `problem_seed` when `preference_model = "bt"`).
    pub rewards: Option<Vec<Vec<f64>>>,
    /// General preference matrices, one per prompt: `preferences[x][i][j] = P(i > j)`,
    /// with `P(i > j) + P(j > i) = 1` and `P(i > i) = 1/2` (default: absent).
    pub preferences: Option<Vec<Vec<Vec<f64>>>>,
    /// Model drawn when neither table is given: `bt` or `general` (default `bt`).
    pub preference_model: PreferenceModel,
    /// Seed of the drawn reward table / preference matrices (default `0`).
    pub problem_seed: u64,
    /// `"uniform"` or explicit log-probs, one row per prompt (default `"uniform"`).
    pub init: Init,
    /// Target of the gap metric for "iterations to target" in summary.json (default `1e-3`).
    pub target_gap: f64,
    /// Sampled mode: responses sampled per drawn prompt (K), >= 2 (default `4`).
    pub k: usize,
    /// Sampled mode, `dpo`/`ipo`: `all` pairs or `best_worst` (default `all`). `sppo` always
    /// uses every sample with its estimated win rate.
    pub pairing: Pairing,
    /// Sampled mode: stop the fit when the gradient norm of the mean empirical loss is
    /// below this, > 0 (default `1e-8`).
    pub tolerance: f64,
    /// Sampled mode: L2 penalty `l2/2 * |u|^2` on the fitted log-ratio
    /// `u = log pi_hat - log pi_t`, added to the *summed* loss (then divided by the
    /// number of pairs), so its weight fades as N grows; keeps DPO's minimizer finite
    /// when a pair is always won. >= 0 (default `1.0`).
    pub l2: f64,
    /// Sampled mode: Newton steps per prompt before a fit counts as unconverged (default `100`).
    pub max_fit_iters: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Both,
            loss: Loss::Dpo,
            alphas: vec![0.0, 0.2, 0.4, 0.6, 0.8, 0.9],
            alpha_schedules: vec![AlphaSchedule::Constant],
            betas: vec![1.0],
            ns: vec![16, 64, 1024],
            seeds: (0..30).collect(),
            iterations: 30,
            num_prompts: None,
            num_responses: None,
            rewards: None,
            preferences: None,
            preference_model: PreferenceModel::Bt,
            problem_seed: 0,
            init: Init::Uniform,
            target_gap: 1e-3,
            k: 4,
            pairing: Pairing::All,
            tolerance: 1e-8,
            l2: 1.0,
            max_fit_iters: 100,
        }
    }
}

/// Default number of prompts when no table fixes it.
pub const DEFAULT_NUM_PROMPTS: usize = 16;
/// Default number of responses per prompt when no table fixes it.
pub const DEFAULT_NUM_RESPONSES: usize = 4;

/// The built-in default run of `prefopt simulate` (what runs without `--config`, and
/// what `--print-config` prints). Every key is listed with its meaning and default.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default_config.toml");

impl Config {
    /// Parses a TOML config. Errors carry serde's message (which names the key and the
    /// line); the caller adds the file path. Also validates the values.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The built-in default run ([`DEFAULT_CONFIG_TOML`]).
    pub fn builtin_default() -> Config {
        Config::from_toml_str(DEFAULT_CONFIG_TOML).expect("the built-in default config is valid")
    }

    /// Checks every value that serde cannot (ranges, shapes, probabilities).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        if self.alphas.is_empty() {
            return bad("alphas", "must list at least one value".into());
        }
        for &a in &self.alphas {
            if !(0.0..1.0).contains(&a) {
                return bad("alphas", format!("{a} is outside [0, 1)"));
            }
        }
        if !self.alpha_schedules.contains(&AlphaSchedule::Constant) {
            return bad("alpha_schedules", "must include \"constant\" (adaptive runs are compared with it)".into());
        }
        if self.betas.is_empty() {
            return bad("betas", "must list at least one value".into());
        }
        for &b in &self.betas {
            if !(b.is_finite() && b > 0.0) {
                return bad("betas", format!("{b} is not a positive number"));
            }
        }
        if self.mode.runs_sampled() {
            if self.ns.is_empty() {
                return bad("ns", "must list at least one value in sampled mode".into());
            }
            if self.ns.contains(&0) {
                return bad("ns", "each N must be >= 1".into());
            }
            if self.seeds.is_empty() {
                return bad("seeds", "must list at least one seed in sampled mode".into());
            }
        }
        if self.iterations == 0 {
            return bad("iterations", "must be >= 1".into());
        }
        if self.num_prompts == Some(0) {
            return bad("num_prompts", "must be >= 1".into());
        }
        if matches!(self.num_responses, Some(r) if r < 2) {
            return bad("num_responses", "must be >= 2".into());
        }
        if !(self.target_gap.is_finite() && self.target_gap > 0.0) {
            return bad("target_gap", format!("{} is not a positive number", self.target_gap));
        }
        if self.k < 2 {
            return bad("k", "must be >= 2 (a pair needs two samples)".into());
        }
        if !(self.tolerance.is_finite() && self.tolerance > 0.0) {
            return bad("tolerance", format!("{} is not a positive number", self.tolerance));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("l2", format!("{} is not a number >= 0", self.l2));
        }
        if self.max_fit_iters == 0 {
            return bad("max_fit_iters", "must be >= 1".into());
        }
        if self.rewards.is_some() && self.preferences.is_some() {
            return bad(
                "preferences",
                "give either `rewards` (Bradley-Terry) or `preferences` (general), not both".into(),
            );
        }
        if let Some(rewards) = &self.rewards {
            check_rows("rewards", rewards)?;
            for (x, row) in rewards.iter().enumerate() {
                for (y, &r) in row.iter().enumerate() {
                    if !r.is_finite() {
                        return bad("rewards", format!("rewards[{x}][{y}] = {r} is not finite"));
                    }
                }
            }
        }
        if let Some(prefs) = &self.preferences {
            if prefs.is_empty() {
                return bad("preferences", "must have at least one prompt".into());
            }
            for (x, m) in prefs.iter().enumerate() {
                let r = m.len();
                if r < 2 {
                    return bad("preferences", format!("prompt {x}: needs at least 2 responses"));
                }
                for (i, row) in m.iter().enumerate() {
                    if row.len() != r {
                        return bad(
                            "preferences",
                            format!(
                                "prompt {x}: matrix is not square (row {i} has {} entries, expected {r})",
                                row.len()
                            ),
                        );
                    }
                    for (j, &p) in row.iter().enumerate() {
                        if !(0.0..=1.0).contains(&p) {
                            return bad(
                                "preferences",
                                format!("preferences[{x}][{i}][{j}] = {p} is not a probability"),
                            );
                        }
                        if (p + m[j][i] - 1.0).abs() > 1e-9 {
                            return bad(
                                "preferences",
                                format!("prompt {x}: P({i} > {j}) + P({j} > {i}) = {} (must be 1)", p + m[j][i]),
                            );
                        }
                    }
                }
            }
        }
        if let Init::LogProbs(rows) = &self.init {
            check_rows("init", rows)?;
            for (x, row) in rows.iter().enumerate() {
                for (y, &l) in row.iter().enumerate() {
                    if !l.is_finite() {
                        return bad(
                            "init",
                            format!(
                                "init[{x}][{y}] = {l} is not finite (zero-probability responses are not supported)"
                            ),
                        );
                    }
                }
            }
        }
        // Shapes must agree between every source that fixes them.
        let shape = self.shape();
        let check_shape = |key: &str, rows: Vec<usize>| -> Result<(), ConfigError> {
            if rows != shape {
                return Err(ConfigError::Invalid {
                    key: key.to_string(),
                    message: format!(
                        "shape (responses per prompt) {rows:?} does not match {shape:?} fixed by the other keys"
                    ),
                });
            }
            Ok(())
        };
        if let Some(rewards) = &self.rewards {
            check_shape("rewards", rewards.iter().map(Vec::len).collect())?;
        }
        if let Some(prefs) = &self.preferences {
            check_shape("preferences", prefs.iter().map(Vec::len).collect())?;
        }
        if let Init::LogProbs(rows) = &self.init {
            check_shape("init", rows.iter().map(Vec::len).collect())?;
        }
        if let Some(p) = self.num_prompts {
            if p != shape.len() {
                return bad(
                    "num_prompts",
                    format!("{p} does not match the {} prompts of the explicit table", shape.len()),
                );
            }
        }
        if let Some(r) = self.num_responses {
            if shape.iter().any(|&s| s != r) {
                return bad("num_responses", format!("{r} does not match the explicit table's rows {shape:?}"));
            }
        }
        // Exact mode needs a closed form.
        if self.mode.runs_exact() && self.loss == Loss::Dpo && !self.is_bradley_terry() {
            return bad(
                "loss",
                "`dpo` in exact mode needs a Bradley-Terry model (`rewards`, or `preference_model = \"bt\"`): \
                 with a general preference matrix DPO's population minimizer has no closed form. \
                 Use `ipo` or `sppo`, or `mode = \"sampled\"`"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the preference model is Bradley-Terry (explicit or drawn rewards).
    pub fn is_bradley_terry(&self) -> bool {
        self.rewards.is_some() || (self.preferences.is_none() && self.preference_model == PreferenceModel::Bt)
    }

    /// Responses per prompt, from the first explicit table or the size keys.
    pub fn shape(&self) -> Vec<usize> {
        if let Some(rewards) = &self.rewards {
            return rewards.iter().map(Vec::len).collect();
        }
        if let Some(prefs) = &self.preferences {
            return prefs.iter().map(Vec::len).collect();
        }
        if let Init::LogProbs(rows) = &self.init {
            return rows.iter().map(Vec::len).collect();
        }
        vec![self.num_responses.unwrap_or(DEFAULT_NUM_RESPONSES); self.num_prompts.unwrap_or(DEFAULT_NUM_PROMPTS)]
    }
}

fn check_rows(key: &str, rows: &[Vec<f64>]) -> Result<(), ConfigError> {
    if rows.is_empty() {
        return Err(ConfigError::Invalid { key: key.into(), message: "must have at least one prompt (row)".into() });
    }
    for (x, row) in rows.iter().enumerate() {
        if row.len() < 2 {
            return Err(ConfigError::Invalid {
                key: key.into(),
                message: format!("row {x} has {} responses; each prompt needs at least 2", row.len()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_default_parses_and_validates() {
        let c = Config::builtin_default();
        assert!(c.mode.runs_exact() && c.mode.runs_sampled());
    }

    #[test]
    fn empty_config_is_the_struct_default() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn builtin_default_is_the_struct_default_plus_a_reward_table() {
        let builtin = Config::builtin_default();
        assert!(builtin.rewards.is_some());
        assert_eq!(Config { rewards: None, ..builtin }, Config::default());
    }

    #[test]
    fn default_config_text_documents_every_key() {
        // Every field of Config appears as a key (commented or not) in the printed TOML.
        let full = Config {
            num_prompts: Some(1),
            num_responses: Some(2),
            rewards: Some(vec![vec![0.0, 1.0]]),
            preferences: Some(vec![vec![vec![0.5, 0.5], vec![0.5, 0.5]]]),
            ..Config::default()
        };
        let value = toml::Value::try_from(&full).unwrap();
        for key in value.as_table().unwrap().keys() {
            let documented = DEFAULT_CONFIG_TOML.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
            });
            assert!(documented, "key `{key}` is not in DEFAULT_CONFIG_TOML");
        }
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = Config::from_toml_str("alpahs = [0.1]\n").unwrap_err().to_string();
        assert!(err.contains("alpahs"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("alphas = [1.0]", "alphas"),
            ("betas = [0.0]", "betas"),
            ("k = 1", "k"),
            ("init = \"gaussian\"", "init"),
            ("rewards = [[1.0]]", "rewards"),
            ("preferences = [[[0.5, 0.7], [0.2, 0.5]]]\nloss = \"ipo\"", "preferences"),
            ("preferences = [[[0.5, 0.7], [0.3, 0.5]]]\nloss = \"dpo\"", "loss"),
            ("rewards = [[0.0, 1.0]]\ninit = [[0.0, 0.0, 0.0]]", "init"),
            ("mode = \"fast\"", "mode"),
        ] {
            let err = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn init_accepts_uniform_and_tables() {
        let c = Config::from_toml_str("init = [[0.0, -1.0], [0.0, 0.0]]").unwrap();
        assert_eq!(c.init, Init::LogProbs(vec![vec![0.0, -1.0], vec![0.0, 0.0]]));
        assert_eq!(c.shape(), vec![2, 2]);
        let c = Config::from_toml_str("init = \"uniform\"").unwrap();
        assert_eq!(c.init, Init::Uniform);
    }
}
