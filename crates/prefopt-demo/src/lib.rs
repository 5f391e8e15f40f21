//! `prefopt demo`: the whole mission on a laptop, no GPU, no network. From the shipped base
//! model (`base_model`), on a built-in task:
//! 1. offline (`offline`): one preference set from the base model's samples; DPO against
//!    SPO on DPO, SimPO against SPO on SimPO, same budget; log-prob trajectories and
//!    held-out accuracy / malformed rate;
//! 2. online (`online`): iterative DPO (alpha 0) against APO (alpha 0.3, 0.6), several seeds;
//! 3. `summary.json` (`summary`) and `report.md` (`report`), with every claim checked seed by
//!    seed. The CLI draws the plots.
//!
//! Every stage's output is kept on disk and reused, so an interrupted demo, rerun with the
//! same arguments, continues where it stopped.

pub mod base_model;
pub mod offline;
pub mod online;
pub mod recipe;
pub mod report;
pub mod summary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use prefopt_loop::apo::LoopObserver;

pub use recipe::Recipe;
pub use summary::Summary;

/// Why the demo stopped. Every message names the folder, file or method involved.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--out` holds a demo of other settings.
    #[error("{}: {message}", out.display())]
    Settings { out: PathBuf, message: String },
    /// A method's training keys do not make a valid training config.
    #[error("method `{method}`: {message}")]
    Method { method: String, message: String },
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// A finished run's output lacks what the summary needs.
    #[error("{}: {message}", path.display())]
    Incomplete { path: PathBuf, message: String },
    #[error(transparent)]
    Fs(#[from] prefopt_fs::FsError),
    #[error(transparent)]
    Loop(#[from] prefopt_loop::LoopError),
    #[error(transparent)]
    Judge(#[from] prefopt_loop::judge::JudgeError),
    #[error(transparent)]
    Train(#[from] prefopt_train::TrainError),
    #[error(transparent)]
    Model(#[from] prefopt_model::ModelError),
    #[error(transparent)]
    Data(#[from] prefopt_data::DataError),
}

impl DemoError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        DemoError::Io { path: path.to_path_buf(), message: e.to_string() }
    }
}

/// Progress of the demo: which run of how many, plus the loop's and trainer's own events.
pub trait DemoObserver: LoopObserver {
    fn run_started(&mut self, _done: usize, _total: usize, _label: &str) {}
}

/// Runs (or resumes) the demo in `out` and writes `summary.json` and `report.md` there.
/// `base` is a model folder; [`base_model::write_base_model`] provides the shipped one.
/// `device` (`cpu`, `cuda`, `cuda:N`) is where every run's tensors live; it is not part of
/// the recipe, so a demo may be resumed on another device.
pub fn run_demo<O: DemoObserver>(
    recipe: &Recipe,
    base: &Path,
    out: &Path,
    device: &str,
    obs: &mut O,
) -> Result<Summary, DemoError> {
    let started = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| DemoError::io(out, e))?;
    // One demo per folder; the runs inside it take their own folders' locks.
    let lock = prefopt_fs::OutputLock::acquire(out)?;
    if let Some(note) = lock.takeover_note() {
        obs.message(&note);
    }
    // A finished demo's folder holds its recipe; another recipe there would mix runs.
    let recipe_path = out.join("recipe.json");
    if recipe_path.exists() {
        let old: serde_json::Value = prefopt_fs::read_json(&recipe_path)?;
        if old != serde_json::to_value(recipe).map_err(|e| DemoError::io(&recipe_path, e))? {
            return Err(DemoError::Settings {
                out: out.to_path_buf(),
                message: "holds a demo with other settings (--quick or --seeds differ); use another --out".into(),
            });
        }
    } else {
        prefopt_fs::write_json(&recipe_path, recipe)?;
    }
    let (mut runs, trajectories) = offline::run_offline(recipe, base, out, device, obs)?;
    runs.extend(online::run_online(recipe, base, out, device, obs)?);

    let base_rows: Vec<&summary::RunRow> = runs.iter().filter(|r| r.method == "base").collect();
    let mean = |f: &dyn Fn(&summary::RunRow) -> f64| {
        base_rows.iter().map(|r| f(r)).sum::<f64>() / base_rows.len().max(1) as f64
    };
    let base = summary::BaseSummary {
        eval_reward: mean(&|r| r.eval_reward),
        eval_accuracy: mean(&|r| r.eval_accuracy.unwrap_or(0.0)),
        malformed_rate: mean(&|r| r.malformed_rate),
    };
    let claims = summary::claims(recipe, &runs);
    let s = Summary {
        recipe: recipe.clone(),
        base,
        runs,
        offline_trajectories: trajectories,
        claims,
        wall_s: started.elapsed().as_secs_f64(),
    };
    prefopt_fs::write_json(&out.join("summary.json"), &s)?;
    prefopt_fs::write_atomic(&out.join("report.md"), report::render(&s).as_bytes())?;
    Ok(s)
}
