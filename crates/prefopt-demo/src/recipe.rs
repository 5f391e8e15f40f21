//! What the demo runs: one fixed recipe (and a smaller `--quick` one), recorded in
//! `summary.json` and described in `report.md`, so every number can be traced to a setting.

use prefopt_loop::apo::AlphaSchedule;
use serde::{Deserialize, Serialize};

/// An offline method: a preference loss, with or without SPO's safe-region penalty.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OfflineMethod {
    /// Name in tables and plots (`dpo`, `dpo+spo`, ...).
    pub name: String,
    /// `[train]` keys of the method (`loss_type`, `beta`, `spo_lambda`, ...).
    pub train: toml::Table,
}

/// An online method: one `prefopt apo` configuration (alpha 0 is iterative DPO).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OnlineMethod {
    /// Name in tables and plots (`iterative-dpo`, `apo-0.3`, `apo-0.6-restart`, ...) and the
    /// run folder `online/<name>/seed-<s>`.
    pub name: String,
    pub alpha: f64,
    /// `constant` (the APO paper) or `restart` (prefopt's own adaptive rule, docs/apo.md).
    pub alpha_schedule: AlphaSchedule,
}

impl OnlineMethod {
    fn new(alpha: f64, alpha_schedule: AlphaSchedule) -> Self {
        let name = match (alpha, alpha_schedule) {
            (0.0, _) => "iterative-dpo".to_string(),
            (_, AlphaSchedule::Constant) => format!("apo-{alpha}"),
            (_, schedule) => format!("apo-{alpha}-{}", schedule.as_str()),
        };
        OnlineMethod { name, alpha, alpha_schedule }
    }
}

/// Every setting of a demo run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recipe {
    /// The built-in task.
    pub task: String,
    /// Seeds: each seed draws its own prompts, samples and data order.
    pub seeds: Vec<u64>,
    /// Sampling of training data and evaluation. The demo samples the full distribution
    /// (1.0 / 1.0), not the APO paper's 0.7 / 0.9: that nucleus cuts every answer mode under
    /// about 10%, which would hide the base model's malformed answers.
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Completions per prompt, ranked by the oracle; best vs worst make a pair.
    pub num_samples: usize,
    /// Held-out prompts of every evaluation (one sample each).
    pub num_eval_prompts: usize,
    /// Training keys shared by every run (optimizer, learning rate, epochs, batch size).
    pub train: toml::Table,

    /// Offline: prompts of the one preference set per seed, sampled from the base model.
    pub offline_prompts: usize,
    pub offline_methods: Vec<OfflineMethod>,
    /// Offline: keys over `train` for every offline method (a longer run than one online
    /// iteration, so the methods get near their optimum and likelihood displacement shows).
    pub offline_train: toml::Table,
    /// Offline: evaluate the chosen/rejected log-probs on the preference set every N steps.
    pub offline_eval_steps: usize,

    /// Online: the methods, each run on every seed with the same prompts and budget.
    pub online_methods: Vec<OnlineMethod>,
    pub iterations: usize,
    pub prompts_per_iteration: usize,
    /// Online: DPO's beta.
    pub beta: f64,
}

fn table(pairs: &[(&str, toml::Value)]) -> toml::Table {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

impl Recipe {
    /// The README's demo: at most 10 minutes on 2 cores.
    pub fn full(seeds: usize) -> Self {
        let s = |x: &str| toml::Value::String(x.into());
        let f = toml::Value::Float;
        let spo_lambda = 1.0;
        Recipe {
            task: "compare".into(),
            seeds: (1..=seeds as u64).collect(),
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 16,
            num_samples: 4,
            num_eval_prompts: 128,
            train: table(&[
                ("optimizer", s("adamw")),
                ("learning_rate", f(5e-4)),
                ("lr_scheduler_type", s("constant")),
                ("num_train_epochs", f(2.0)),
                ("batch_size", toml::Value::Integer(16)),
                ("max_grad_norm", f(1.0)),
                ("max_length", toml::Value::Integer(64)),
                ("logging_steps", toml::Value::Integer(1)),
                ("save_steps", toml::Value::Integer(0)),
            ]),
            offline_prompts: 128,
            offline_train: table(&[("learning_rate", f(1e-3)), ("num_train_epochs", f(4.0))]),
            offline_methods: vec![
                OfflineMethod { name: "dpo".into(), train: table(&[("loss_type", s("sigmoid")), ("beta", f(0.1))]) },
                OfflineMethod {
                    name: "dpo+spo".into(),
                    train: table(&[("loss_type", s("sigmoid")), ("beta", f(0.1)), ("spo_lambda", f(spo_lambda))]),
                },
                OfflineMethod {
                    name: "simpo".into(),
                    train: table(&[("loss_type", s("simpo")), ("beta", f(2.5)), ("simpo_gamma", f(0.5))]),
                },
                OfflineMethod {
                    name: "simpo+spo".into(),
                    train: table(&[
                        ("loss_type", s("simpo")),
                        ("beta", f(2.5)),
                        ("simpo_gamma", f(0.5)),
                        ("spo_lambda", f(spo_lambda)),
                    ]),
                },
            ],
            offline_eval_steps: 4,
            online_methods: vec![
                OnlineMethod::new(0.0, AlphaSchedule::Constant),
                OnlineMethod::new(0.3, AlphaSchedule::Constant),
                OnlineMethod::new(0.6, AlphaSchedule::Constant),
                OnlineMethod::new(0.6, AlphaSchedule::Restart),
                OnlineMethod::new(0.6, AlphaSchedule::Monotone),
            ],
            iterations: 4,
            prompts_per_iteration: 64,
            beta: 0.5,
        }
    }

    /// `--quick` (for CI): one seed, fewer prompts, DPO and SPO only, iterative DPO and APO
    /// at alpha 0.3, 2 iterations;
    /// under 2 minutes on 2 cores.
    pub fn quick(seeds: usize) -> Self {
        let mut r = Recipe::full(seeds);
        r.num_eval_prompts = 96;
        r.offline_prompts = 64;
        r.offline_methods.truncate(2);
        r.offline_eval_steps = 2;
        r.online_methods.truncate(2);
        r.iterations = 2;
        r.prompts_per_iteration = 48;
        r
    }
}
