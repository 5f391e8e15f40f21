//! Learning-rate schedules with linear warm-up, as Hugging Face transformers' `get_scheduler`
//! builds them (transformers 5.23 `optimization.py`), so a run's learning rate matches TRL's
//! step for step.
//!
//! Convention (that of `torch.optim.lr_scheduler.LambdaLR` as the HF Trainer drives it):
//! `lr_at(s)` is the learning rate of the optimizer step with 0-based index `s`, i.e. the
//! `(s+1)`-th update. With warm-up, the first update therefore uses learning rate 0.

/// The schedule family. Names follow `TrainingArguments.lr_scheduler_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// The base learning rate after a linear warm-up from 0 (HF `constant_with_warmup`;
    /// with no warm-up steps it is HF `constant`). Note: HF's own `constant` ignores the
    /// warm-up setting, ours does not.
    #[serde(alias = "constant_with_warmup")]
    Constant,
    /// Linear warm-up from 0, then linear decay to 0 at `total_steps` (HF `linear`).
    Linear,
    /// Linear warm-up from 0, then half a cosine wave down to 0 at `total_steps`
    /// (HF `cosine` with `num_cycles = 0.5`).
    Cosine,
}

/// A learning-rate schedule: the learning rate as a function of the optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    /// The peak learning rate, reached at the end of warm-up.
    pub base_lr: f64,
    /// Resolved warm-up length in optimizer steps (see [`warmup_steps`]).
    pub warmup_steps: usize,
    /// Number of optimizer steps of the whole run (HF `num_training_steps`).
    pub total_steps: usize,
}

/// The warm-up length the HF Trainer uses: `warmup_steps` when it is > 0, otherwise
/// `ceil(total_steps * warmup_ratio)` computed in f64, exactly as
/// `TrainingArguments.get_warmup_steps` does (transformers 4.x: `warmup_steps if warmup_steps > 0
/// else math.ceil(num_training_steps * warmup_ratio)`; transformers 5 folded the ratio into
/// `warmup_steps`, a float in `[0, 1)`, with the same `ceil`).
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else if warmup_ratio > 0.0 {
        (total_steps as f64 * warmup_ratio).ceil() as usize
    } else {
        0
    }
}

impl Schedule {
    /// A schedule whose warm-up is `warmup_steps` if > 0, else `ceil(warmup_ratio * total_steps)`.
    pub fn new(kind: SchedulerKind, base_lr: f64, warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> Self {
        Self { kind, base_lr, warmup_steps: self::warmup_steps(warmup_steps, warmup_ratio, total_steps), total_steps }
    }

    /// The multiplier of `base_lr` at 0-based optimizer step `step`: HF's `lr_lambda`.
    /// Past `total_steps` it keeps HF's formulas (linear stays at 0; cosine rises again, as HF's
    /// does), though a run never asks for those steps.
    pub fn multiplier(&self, step: usize) -> f64 {
        let (s, w, n) = (step as i64, self.warmup_steps as i64, self.total_steps as i64);
        if s < w {
            return s as f64 / w.max(1) as f64;
        }
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => ((n - s) as f64 / (n - w).max(1) as f64).max(0.0),
            SchedulerKind::Cosine => {
                let progress = (s - w) as f64 / (n - w).max(1) as f64;
                // HF: math.pi * float(num_cycles) * 2.0 * progress, num_cycles = 0.5.
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of 0-based optimizer step `step` (the `(step+1)`-th update).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.multiplier(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/expected/optim/optim.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn lr_matches_transformers_get_scheduler_at_every_step() {
        let fx = fixture();
        let runs = fx["schedules"]["runs"].as_array().unwrap();
        assert!(runs.len() >= 15);
        let mut max_err = 0f64;
        for run in runs {
            let kind = match run["name"].as_str().unwrap() {
                "constant" | "constant_with_warmup" => SchedulerKind::Constant,
                "linear" => SchedulerKind::Linear,
                "cosine" => SchedulerKind::Cosine,
                other => panic!("unknown schedule {other}"),
            };
            let sched = Schedule::new(
                kind,
                run["base_lr"].as_f64().unwrap(),
                run["warmup_steps"].as_u64().unwrap() as usize,
                0.0,
                run["total_steps"].as_u64().unwrap() as usize,
            );
            for (step, want) in run["lrs"].as_array().unwrap().iter().enumerate() {
                let (want, got) = (want.as_f64().unwrap(), sched.lr_at(step));
                let err = (got - want).abs();
                max_err = max_err.max(err / want.abs().max(1e-30));
                assert!(err <= 1e-12 * want.abs() + 1e-20, "{run}: step {step}: got {got}, want {want}");
            }
        }
        eprintln!("schedules: max relative error vs transformers {max_err:e}");
    }

    #[test]
    fn warmup_from_ratio_rounds_up_like_transformers() {
        let fx = fixture();
        for case in fx["schedules"]["warmup_from_ratio"].as_array().unwrap() {
            let (ratio, total) = (case["ratio"].as_f64().unwrap(), case["total_steps"].as_u64().unwrap() as usize);
            let want = case["warmup_steps"].as_u64().unwrap() as usize;
            assert_eq!(warmup_steps(0, ratio, total), want, "{case}");
        }
        // Explicit steps win over the ratio.
        assert_eq!(warmup_steps(5, 0.5, 100), 5);
        assert_eq!(Schedule::new(SchedulerKind::Linear, 1.0, 0, 0.1, 100).warmup_steps, 10);
    }

    #[test]
    fn warmup_boundaries_and_end_values() {
        let lin = Schedule::new(SchedulerKind::Linear, 1e-3, 4, 0.0, 20);
        assert_eq!(lin.lr_at(0), 0.0);
        assert!((lin.lr_at(2) - 0.5e-3).abs() < 1e-18);
        assert_eq!(lin.lr_at(4), 1e-3); // warm-up done: the peak
        assert_eq!(lin.lr_at(20), 0.0);
        assert!(lin.lr_at(19) > 0.0); // the last update still learns
        let cos = Schedule::new(SchedulerKind::Cosine, 1e-3, 4, 0.0, 20);
        assert_eq!(cos.lr_at(4), 1e-3);
        assert!((cos.lr_at(12) - 0.5e-3).abs() < 1e-15); // half way through the decay
        assert!(cos.lr_at(20).abs() < 1e-18);
        let constant = Schedule::new(SchedulerKind::Constant, 1e-3, 4, 0.0, 20);
        assert_eq!(constant.lr_at(1), 0.25e-3);
        assert_eq!(constant.lr_at(4), 1e-3);
        assert_eq!(constant.lr_at(1000), 1e-3);
        let flat = Schedule::new(SchedulerKind::Constant, 1e-3, 0, 0.0, 20);
        assert_eq!(flat.lr_at(0), 1e-3);
    }

    #[test]
    fn kind_names_follow_hf_lr_scheduler_type() {
        let parse = |s: &str| serde_json::from_str::<SchedulerKind>(&format!("\"{s}\"")).unwrap();
        assert_eq!(parse("constant"), SchedulerKind::Constant);
        assert_eq!(parse("constant_with_warmup"), SchedulerKind::Constant);
        assert_eq!(parse("linear"), SchedulerKind::Linear);
        assert_eq!(parse("cosine"), SchedulerKind::Cosine);
        assert_eq!(serde_json::to_string(&SchedulerKind::Cosine).unwrap(), "\"cosine\"");
    }
}
