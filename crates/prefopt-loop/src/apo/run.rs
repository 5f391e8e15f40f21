//! `prefopt apo`'s run: the iterations as named stages (sample, judge and pair, reference,
//! train, extrapolate, evaluate), each writing its output atomically and skipped when that
//! output exists, so a killed run, rerun with the same command, continues from the last
//! finished stage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use prefopt_data::{parse_prompt, read_records, HfTokenizer};
use prefopt_model::stack::{read_stack, save_stack_dir, StackEntry};
use prefopt_model::{save_model_dir, Mode, Policy, SamplingParams};
use prefopt_train::TrainConfig;
use serde::{Deserialize, Serialize};

use super::config::{AlphaSchedule, ApoConfig, Extrapolation, SamplerSync};
use crate::evaluate::{evaluate_model, network, BaseSamples, EvalMetrics};
use crate::extrapolate::{extrapolate, extrapolate_logps, extrapolate_stack, momentum_agreement};
use crate::judge::{judge_from_spec_with, Judge, PromptItem};
use crate::remote::RemoteSampler;
use crate::sampling::{remote_sample_records, sample_records, SampleRecord};
use crate::{seeds, LoopError};

/// What the loop reports as it goes (the CLI draws progress from it).
pub trait LoopObserver: prefopt_train::Observer {
    fn stage(&mut self, _iteration: usize, _stage: &str) {}
    fn samples(&mut self, _done: usize, _total: usize) {}
    /// A judge that asks a server (`llm:`): requests answered so far, of `total`.
    fn judged(&mut self, _done: usize, _total: usize) {}
}

/// One iteration's record in `manifest.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IterationRecord {
    pub iteration: usize,
    /// The extrapolation coefficient this iteration used (`alpha`, or 0 where an adaptive
    /// `alpha_schedule` dropped the momentum).
    pub alpha: f64,
    /// `alpha_schedule = "restart"`, from iteration 2: the agreement of this iteration's step
    /// with the momentum on its pairs (negative: restarted; see `momentum_agreement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum_agreement: Option<f64>,
    /// `alpha_schedule = "monotone"`: the mean judged score of the candidate `pi_t`'s samples
    /// on the next iteration's prompts minus that of `pi_hat_t`'s (negative: the candidate
    /// was dropped and `pi_t = pi_hat_t`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_advantage: Option<f64>,
    pub beta: f64,
    pub samples: PathBuf,
    pub pairs: PathBuf,
    pub trained: PathBuf,
    pub extrapolated: PathBuf,
    /// With LoRA (`train.use_peft`): iteration t's adapter `D_t` (a PEFT folder), trained on
    /// top of `pi_{t-1}`; `trained` and `extrapolated` are then adapter stacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    pub pair_count: usize,
    pub skipped_prompts: usize,
    /// An `llm:` judge's verdicts on this iteration's samples: requests, first and second
    /// place wins, ties, and replies that were not a verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_verdicts: Option<crate::judge::VerdictStats>,
    /// `extrapolation = "logprob"`, from iteration 2: the pairs with the extrapolated
    /// reference's log-probs, which training reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_pairs: Option<PathBuf>,
    pub eval_trained: Option<EvalMetrics>,
    pub eval_extrapolated: Option<EvalMetrics>,
    /// Seconds per stage (sampling, judging, training, extrapolation, evaluation) in this
    /// process; a resumed stage counts only the time of the run that finished it.
    pub wall_s: std::collections::BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub config: serde_json::Value,
    pub base_eval: Option<EvalMetrics>,
    pub iterations: Vec<IterationRecord>,
}

/// Runs (or resumes) the whole loop; returns the manifest.
pub fn run_apo(cfg: &ApoConfig, obs: &mut dyn LoopObserver) -> Result<Manifest, LoopError> {
    // `ApoConfig::load` validates too; this covers configs built in code.
    cfg.validate().map_err(|message| LoopError::Config { source_name: "the APO config".into(), message })?;
    let mut run = LoopRun::open(cfg, obs)?;
    for t in 1..=cfg.iterations {
        let mut it = run.iteration(t)?;
        run.sample(&mut it, obs)?;
        run.judge_and_pair(&mut it, obs)?;
        let train_cfg = run.reference(&mut it, obs)?;
        run.train(&mut it, &train_cfg, obs)?;
        run.momentum(&mut it, &train_cfg, obs)?;
        run.safeguard(&mut it, obs)?;
        run.extrapolate(&mut it, obs)?;
        run.evaluate(&mut it, obs)?;
    }
    Ok(run.manifest)
}

/// Everything the stages share: the config, the manifest, the tokenizer, the judge, the
/// prompts and the base model's held-out samples.
struct LoopRun<'a> {
    cfg: &'a ApoConfig,
    /// `output_dir`'s lock, held for the whole run (one writer per folder).
    _lock: prefopt_fs::OutputLock,
    device: Device,
    manifest: Manifest,
    manifest_path: PathBuf,
    tok: HfTokenizer,
    judge: Box<dyn Judge>,
    sampling: SamplingParams,
    train_prompts: Vec<PromptItem>,
    eval_prompts: Vec<PromptItem>,
    /// The shuffled prompt indices; iteration t takes the t-th fold.
    order: Vec<usize>,
    base: BaseSamples,
    /// `sampler = "openai"`: the server, and the policy folder it was last synced to.
    remote: Option<RemoteSampler>,
    synced: std::sync::Mutex<Option<PathBuf>>,
}

/// One iteration in progress: its record and its folder.
struct Iteration {
    t: usize,
    dir: PathBuf,
    record: IterationRecord,
}

impl<'a> LoopRun<'a> {
    /// Opens (or reopens) `output_dir`: a manifest of another config there is an error;
    /// then the judge, the prompts and the base model's held-out samples.
    fn open(cfg: &'a ApoConfig, obs: &mut dyn LoopObserver) -> Result<Self, LoopError> {
        let device = prefopt_model::parse_device(&cfg.device)?;
        let out = &cfg.output_dir;
        std::fs::create_dir_all(out).map_err(|e| LoopError::OutputDir { dir: out.clone(), message: e.to_string() })?;
        let lock = prefopt_fs::OutputLock::acquire(out)?;
        if let Some(note) = lock.takeover_note() {
            obs.message(&note);
        }
        let manifest_path = out.join("manifest.json");
        let config = serde_json::to_value(cfg).map_err(|e| prefopt_fs::FsError::io(&manifest_path, e))?;
        let mut manifest = if manifest_path.exists() {
            let m: Manifest = prefopt_fs::read_json(&manifest_path)?;
            if without_operational_keys(&m.config) != without_operational_keys(&config) {
                return Err(LoopError::OutputDir {
                    dir: out.clone(),
                    message: "holds a run with another config; use another output_dir (or the same config to resume)"
                        .into(),
                });
            }
            obs.message(&format!("resuming the run in {}", out.display()));
            Manifest { config, ..m }
        } else {
            Manifest { config, ..Manifest::default() }
        };

        let tok = HfTokenizer::from_dir(&cfg.model)?;
        let mut judge = judge_from_spec_with(&cfg.judge, &device, &cfg.judge_options()?)?;
        let train_prompts = load_prompts(&cfg.prompts, cfg.num_prompts, cfg.seed)?;
        if train_prompts.is_empty() {
            return Err(LoopError::Prompts { spec: cfg.prompts.clone(), message: "no prompts".into() });
        }
        let eval_spec = cfg.eval_prompts.clone().unwrap_or_else(|| cfg.prompts.clone());
        let eval_prompts = load_prompts(&eval_spec, cfg.num_eval_prompts, seeds::eval_prompts(cfg.seed))?;
        let sampling = cfg.sampling(&tok);
        // The base model's held-out samples: the baseline of every win rate and KL estimate.
        let base = BaseSamples::load_or_make(
            &out.join("eval-base.jsonl"),
            &cfg.model,
            &tok,
            &eval_prompts,
            &sampling,
            cfg.seed,
            judge.as_mut(),
            &device,
        )?;
        if manifest.base_eval.is_none() {
            manifest.base_eval = Some(base.metrics.clone());
            prefopt_fs::write_json(&manifest_path, &manifest)?;
        }
        let order = fold_order(train_prompts.len(), cfg.seed);
        let remote = cfg.remote_sampler()?;
        Ok(Self {
            cfg,
            _lock: lock,
            device,
            manifest,
            manifest_path,
            tok,
            judge,
            sampling,
            train_prompts,
            eval_prompts,
            order,
            base,
            remote,
            synced: std::sync::Mutex::new(None),
        })
    }

    /// Iteration t's record: from the manifest when an earlier run got that far, else new.
    fn iteration(&self, t: usize) -> Result<Iteration, LoopError> {
        let dir = self.cfg.output_dir.join(format!("iter-{t}"));
        std::fs::create_dir_all(&dir).map_err(|e| prefopt_fs::FsError::io(&dir, e))?;
        let record = self.record_of(t).cloned().unwrap_or_else(|| IterationRecord {
            iteration: t,
            alpha: self.cfg.alpha,
            beta: self.cfg.beta_at(t),
            samples: dir.join("samples.jsonl"),
            pairs: dir.join("pairs.jsonl"),
            trained: dir.join("trained"),
            extrapolated: dir.join("extrapolated"),
            ..IterationRecord::default()
        });
        Ok(Iteration { t, dir, record })
    }

    /// Iteration t's record in the manifest, once an earlier stage has saved it.
    fn record_of(&self, t: usize) -> Option<&IterationRecord> {
        self.manifest.iterations.iter().find(|r| r.iteration == t)
    }

    /// `pi_{t-1}`: the sampler, training start and reference of iteration t (the base at t = 1).
    fn sampler(&self, t: usize) -> PathBuf {
        self.model_of(t - 1, "extrapolated")
    }

    /// `pi_hat_t` (the base at t = 0).
    fn trained(&self, t: usize) -> PathBuf {
        self.model_of(t, "trained")
    }

    fn model_of(&self, t: usize, which: &str) -> PathBuf {
        if t == 0 {
            self.cfg.model.clone()
        } else {
            self.cfg.output_dir.join(format!("iter-{t}/{which}"))
        }
    }

    /// Runs one stage's work (reported to `obs`, timed into the record), then saves the
    /// record in the manifest.
    fn stage<T>(
        &mut self,
        it: &mut Iteration,
        name: &str,
        obs: &mut dyn LoopObserver,
        work: impl FnOnce(&mut Self, &mut Iteration, &mut dyn LoopObserver) -> Result<T, LoopError>,
    ) -> Result<T, LoopError> {
        obs.stage(it.t, name);
        let started = Instant::now();
        let out = work(self, it, obs)?;
        it.record.wall_s.insert(name.into(), started.elapsed().as_secs_f64());
        self.save(&it.record)?;
        Ok(out)
    }

    /// Puts `record` into the manifest and writes it.
    fn save(&mut self, record: &IterationRecord) -> Result<(), LoopError> {
        match self.manifest.iterations.iter_mut().find(|r| r.iteration == record.iteration) {
            Some(r) => *r = record.clone(),
            None => self.manifest.iterations.push(record.clone()),
        }
        Ok(prefopt_fs::write_json(&self.manifest_path, &self.manifest)?)
    }

    /// Stage 1: K completions per prompt of this iteration's fold, from `pi_{t-1}`.
    fn sample(&mut self, it: &mut Iteration, obs: &mut dyn LoopObserver) -> Result<(), LoopError> {
        if it.record.samples.exists() {
            return Ok(());
        }
        // `monotone` sampled this fold from pi_{t-1} already, to judge it: the same model, prompts
        // and seed, so the same samples.
        let judged = self.record_of(it.t - 1).and_then(|r| {
            let dir = r.extrapolated.parent()?;
            let file = if r.alpha == 0.0 { SAFEGUARD_TRAINED } else { SAFEGUARD_EXTRAPOLATED };
            Some(dir.join(file)).filter(|p| r.judged_advantage.is_some() && p.exists())
        });
        self.stage(it, "sampling", obs, |run, it, obs| {
            if let Some(judged) = judged {
                let records: Vec<SampleRecord> = prefopt_fs::read_jsonl(&judged)?;
                return Ok(prefopt_fs::write_jsonl(&it.record.samples, &records)?);
            }
            run.sample_fold(&run.sampler(it.t), it.t, &it.record.samples, obs)?;
            Ok(())
        })
    }

    /// K completions per prompt of iteration t's fold from the model in `dir`, seeded by t,
    /// written to `out`: sampled here, or asked of the server (`sampler = "openai"`, its answers
    /// kept in `<out>.partial.jsonl` until `out` is written).
    fn sample_fold(
        &self,
        dir: &Path,
        t: usize,
        out: &Path,
        obs: &mut dyn LoopObserver,
    ) -> Result<Vec<SampleRecord>, LoopError> {
        let cfg = self.cfg;
        let fold: Vec<&PromptItem> = (0..cfg.prompts_per_iteration)
            .map(|i| &self.train_prompts[self.order[((t - 1) * cfg.prompts_per_iteration + i) % self.order.len()]])
            .collect();
        let net = network(dir, &self.device)?;
        let seed = seeds::iteration_samples(cfg.seed, t);
        let Some(remote) = &self.remote else {
            let records =
                sample_records(&net, &self.tok, &fold, cfg.num_samples, &self.sampling, seed, &mut |d, n| {
                    obs.samples(d, n)
                })?;
            prefopt_fs::write_jsonl(out, &records)?;
            return Ok(records);
        };
        let model = self.sync_sampler(remote, dir)?;
        let partial = out.with_extension("partial.jsonl");
        let (tok, params, fold, net, model, partial_ref) = (&self.tok, &self.sampling, &fold, &net, &model, &partial);
        let (records, mismatched) = with_progress(
            obs,
            |o, d, n| o.samples(d, n),
            |progress| {
                remote_sample_records(
                    remote,
                    model,
                    net,
                    tok,
                    fold,
                    cfg.num_samples,
                    params,
                    seed,
                    partial_ref,
                    progress,
                )
            },
        )?;
        if mismatched > 0 {
            obs.message(&format!(
                "iteration {t}: {mismatched} of {} sampled completions do not re-tokenize to the same text (the server \
                 returned no token ids)",
                records.len() * cfg.num_samples
            ));
        }
        prefopt_fs::write_jsonl(out, &records)?;
        prefopt_fs::remove_file_if_exists(&partial)?;
        Ok(records)
    }

    /// Makes the server serve the policy in `dir` (`sampler_sync`) and returns the model name
    /// to ask for.
    fn sync_sampler(&self, remote: &RemoteSampler, dir: &Path) -> Result<String, LoopError> {
        let folder = std::fs::canonicalize(dir).map_err(|e| prefopt_fs::FsError::io(dir, e))?;
        let cfg = self.cfg;
        if cfg.sampler_sync == SamplerSync::Path {
            return Ok(folder.display().to_string());
        }
        if cfg.sampler_sync == SamplerSync::Lora {
            return self.sync_adapter(remote, &folder);
        }
        let mut synced = self.synced.lock().map_err(|_| remote.client.error("models", "sync", "lock poisoned"))?;
        if synced.as_deref() != Some(folder.as_path()) {
            let command = cfg
                .sampler_sync_command
                .clone()
                .unwrap_or_default()
                .replace("{model_dir}", &folder.display().to_string());
            let status = std::process::Command::new("sh").arg("-c").arg(&command).status().map_err(|e| {
                remote.client.error("models", "sync", format!("sampler_sync_command `{command}` did not start: {e}"))
            })?;
            if !status.success() {
                let message = format!("sampler_sync_command `{command}` failed ({status})");
                return Err(remote.client.error("models", "sync", message).into());
            }
            remote.client.wait_until_up(std::time::Duration::from_secs_f64(cfg.sampler_timeout_s))?;
            *synced = Some(folder.clone());
        }
        Ok(cfg.sampler_model.clone().unwrap_or_else(|| folder.display().to_string()))
    }

    /// `sampler_sync = "lora"`: the base is served as `sampler_model`; a stack's adapters are
    /// written as one adapter next to it (`<folder>-lora/`, once), loaded into the server
    /// under the name `prefopt-<iteration folder>-<folder>` and asked for by that name.
    fn sync_adapter(&self, remote: &RemoteSampler, folder: &Path) -> Result<String, LoopError> {
        if !prefopt_model::stack::is_stack(folder) {
            return Ok(self.cfg.sampler_model.clone().unwrap_or_default());
        }
        let leaf = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = folder.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        let name = format!("prefopt-{}-{leaf}", parent.unwrap_or_default());
        let adapter = folder.with_file_name(format!("{leaf}-lora"));
        if !adapter.exists() {
            let (base, entries) = read_stack(folder)?;
            prefopt_model::stack::save_concatenated_adapter(&base, &entries, &adapter, &self.device)?;
        }
        let mut synced =
            self.synced.lock().map_err(|_| remote.client.error("load_lora_adapter", "sync", "lock poisoned"))?;
        if synced.as_deref() != Some(folder) {
            remote.load_lora_adapter(&name, &adapter)?;
            *synced = Some(folder.to_path_buf());
        }
        Ok(name)
    }

    /// Stage 2: judge the samples and pair best vs worst (prompts whose samples all tie are skipped).
    fn judge_and_pair(&mut self, it: &mut Iteration, obs: &mut dyn LoopObserver) -> Result<(), LoopError> {
        if it.record.pairs.exists() {
            if it.record.pair_count == 0 {
                it.record.pair_count = prefopt_fs::read_jsonl::<serde_json::Value>(&it.record.pairs)?.len();
                self.save(&it.record)?;
            }
            return Ok(());
        }
        self.stage(it, "judging", obs, |run, it, obs| {
            let samples: Vec<SampleRecord> = prefopt_fs::read_jsonl(&it.record.samples)?;
            // Count this stage's verdicts alone (evaluation's came before).
            let _ = run.judge.take_verdict_stats();
            let (pairs, skipped) = with_progress(
                obs,
                |o, d, n| o.judged(d, n),
                |progress| {
                    crate::pairing::judge_and_pair(
                        run.judge.as_mut(),
                        &samples,
                        &it.record.samples,
                        run.cfg.num_samples,
                        progress,
                    )
                },
            )?;
            if let Some(stats) = run.judge.take_verdict_stats() {
                if stats.failures > 0 {
                    obs.message(&format!(
                        "iteration {}: {} of {} judge replies were not a verdict (left out of the scores)",
                        it.t, stats.failures, stats.requests
                    ));
                }
                it.record.judge_verdicts = Some(stats);
            }
            if pairs.is_empty() {
                return Err(LoopError::Verdicts {
                    judge: run.cfg.judge.clone(),
                    message: format!("tied every prompt's samples in iteration {}; nothing to train on", it.t),
                });
            }
            // The record first, then the file whose existence marks the stage done: a kill
            // between the two reruns the stage instead of keeping a record without its counts.
            it.record.pair_count = pairs.len();
            it.record.skipped_prompts = skipped;
            run.save(&it.record)?;
            prefopt_fs::write_jsonl(&it.record.pairs, &pairs)?;
            // The verdicts are in the pairs now.
            prefopt_fs::remove_file_if_exists(&crate::pairing::verdict_journal(&it.record.samples))?;
            Ok(())
        })
    }

    /// Stage 3, the inner training config: with `extrapolation = "logprob"` (t >= 2, a loss
    /// with a reference) the pairs get the policy-space reference
    /// `pi_{t-1} ∝ pi_hat_{t-1} (pi_hat_{t-1} / pi_hat_{t-2})^alpha` as reference log-prob
    /// columns.
    fn reference(&mut self, it: &mut Iteration, obs: &mut dyn LoopObserver) -> Result<TrainConfig, LoopError> {
        let (cfg, t) = (self.cfg, it.t);
        let mut train_cfg = cfg.train_config(t, &self.sampler(t), &it.record.pairs, &it.dir.join("train"))?;
        let exact_reference = cfg.extrapolation == Extrapolation::Logprob && t >= 2 && train_cfg.needs_reference();
        if !exact_reference {
            return Ok(train_cfg);
        }
        let with_reference = it.dir.join("pairs-ref.jsonl");
        train_cfg.train_data = with_reference.clone();
        it.record.reference_pairs = Some(with_reference.clone());
        if !it.record.trained.exists() && !with_reference.exists() {
            // pi_{t-1} is extrapolated with iteration t-1's coefficient (0 after a restart).
            let alpha = self.record_of(t - 1).map_or(cfg.alpha, |r| r.alpha);
            self.stage(it, "reference", obs, |run, it, _| {
                let (newer, older) = (run.trained(t - 1), run.trained(t - 2));
                write_extrapolated_reference(&train_cfg, &it.record.pairs, &newer, &older, alpha, &with_reference)
            })?;
        }
        Ok(train_cfg)
    }

    /// Stage 4: train `pi_hat_t` from `pi_{t-1}`'s weights with reference `pi_{t-1}`. With LoRA, a
    /// fresh adapter `D_t` on top of `pi_{t-1}` (frozen, the reference too), and `pi_hat_t`
    /// is the stack `pi_{t-1} + D_t`.
    fn train(
        &mut self,
        it: &mut Iteration,
        train_cfg: &TrainConfig,
        obs: &mut dyn LoopObserver,
    ) -> Result<(), LoopError> {
        if it.record.trained.exists() {
            return Ok(());
        }
        self.stage(it, "training", obs, |run, it, obs| {
            let lora = train_cfg.uses_lora();
            let done = if lora { it.dir.join("adapter") } else { it.record.trained.clone() };
            if !done.exists() {
                // A run killed during training continues from its newest checkpoint (the config
                // says `resume_from_checkpoint = "latest"`); one killed between the trainer's
                // final/ and the rename below only renames.
                let finished = train_cfg.output_dir.join("final");
                if !finished.exists() {
                    prefopt_train::train(train_cfg, obs)?;
                }
                std::fs::rename(&finished, &done).map_err(|e| prefopt_fs::FsError::io(&done, e))?;
            }
            if lora {
                let (base, mut entries) = read_stack(&run.sampler(it.t))?;
                // (save_stack_dir resolves the path itself.)
                entries.push(StackEntry { adapter: done.clone(), coefficient: 1.0 });
                save_stack_dir(&it.record.trained, &base, &entries)?;
                it.record.adapter = Some(done);
            }
            Ok(())
        })
    }

    /// Stage 5a, `alpha_schedule = "restart"` from iteration 2 (at t = 1 the step and the
    /// momentum are the same, so they agree): the agreement of the step `pi_{t-1} -> pi_hat_t`
    /// with the momentum `pi_hat_{t-1} -> pi_hat_t` on this iteration's pairs, and this
    /// iteration's alpha: 0 when they disagree (prefopt's own rule; see
    /// [`momentum_agreement`]).
    fn momentum(
        &mut self,
        it: &mut Iteration,
        train_cfg: &TrainConfig,
        obs: &mut dyn LoopObserver,
    ) -> Result<(), LoopError> {
        let cfg = self.cfg;
        if cfg.alpha_schedule != AlphaSchedule::Restart || cfg.alpha == 0.0 || it.t < 2 {
            return Ok(());
        }
        if it.record.momentum_agreement.is_some() || it.record.extrapolated.exists() {
            return Ok(());
        }
        self.stage(it, "momentum", obs, |run, it, _| {
            let t = it.t;
            let dirs = [run.trained(t), run.sampler(t), run.trained(t - 1)];
            let (_, scores) = score_pair_file(train_cfg, &it.record.pairs, &dirs)?;
            let agreement = momentum_agreement(&scores[0], &scores[1], &scores[2]);
            it.record.momentum_agreement = Some(agreement);
            it.record.alpha = prefopt_sim::restart::gated_alpha(cfg.alpha, agreement);
            Ok(())
        })
    }

    /// Stage 5b, `alpha_schedule = "monotone"`: the candidate `pi_t` (extrapolated with
    /// alpha) and `pi_hat_t` each sample the next iteration's prompts, the judge scores both,
    /// and the candidate is kept only if its mean score is at least `pi_hat_t`'s; otherwise
    /// this iteration's alpha is 0 (prefopt's own rule; see [`prefopt_sim::restart`]). The
    /// chosen model's samples are the next iteration's (kept in this iteration's folder).
    fn safeguard(&mut self, it: &mut Iteration, obs: &mut dyn LoopObserver) -> Result<(), LoopError> {
        let cfg = self.cfg;
        if cfg.alpha_schedule != AlphaSchedule::Monotone || cfg.alpha == 0.0 {
            return Ok(());
        }
        if it.record.judged_advantage.is_some() || it.record.extrapolated.exists() {
            return Ok(());
        }
        self.stage(it, "safeguard", obs, |run, it, obs| {
            let candidate = it.dir.join("candidate");
            run.write_extrapolated(it, cfg.alpha, &candidate)?;
            let mut samples_of = |dir: &Path, file: &str| -> Result<(Vec<SampleRecord>, PathBuf), LoopError> {
                let path = it.dir.join(file);
                let records = match path.exists() {
                    true => prefopt_fs::read_jsonl(&path)?,
                    false => run.sample_fold(dir, it.t + 1, &path, obs)?,
                };
                Ok((records, path))
            };
            let (candidate, candidate_path) = samples_of(&candidate, SAFEGUARD_EXTRAPOLATED)?;
            let (trained, trained_path) = samples_of(&it.record.trained, SAFEGUARD_TRAINED)?;
            let judge = run.judge.as_mut();
            // A pairwise judge compares the two models' samples directly; a scorer scores each.
            let advantage = with_progress(
                obs,
                |o, d, n| o.judged(d, n),
                |progress| match judge.as_pairwise() {
                    Some(pairwise) => {
                        crate::pairing::pairwise_advantage(pairwise, &candidate, &trained, &candidate_path, progress)
                    }
                    None => {
                        let k = cfg.num_samples;
                        Ok(crate::pairing::mean_score(judge, &candidate, &candidate_path, k, progress)?
                            - crate::pairing::mean_score(judge, &trained, &trained_path, k, &mut |_, _| {})?)
                    }
                },
            )?;
            it.record.judged_advantage = Some(advantage);
            it.record.alpha = prefopt_sim::restart::gated_alpha(cfg.alpha, advantage);
            run.save(&it.record)?;
            for path in [&candidate_path, &trained_path] {
                prefopt_fs::remove_file_if_exists(&crate::pairing::verdict_journal(path))?;
            }
            Ok(())
        })
    }

    /// Stage 5: extrapolate, `theta_t = theta_hat_t + alpha (theta_hat_t - theta_hat_{t-1})`
    /// with this iteration's alpha (a kept `monotone` candidate is that model already).
    fn extrapolate(&mut self, it: &mut Iteration, obs: &mut dyn LoopObserver) -> Result<(), LoopError> {
        if it.record.extrapolated.exists() {
            return Ok(());
        }
        self.stage(it, "extrapolation", obs, |run, it, _| {
            let (out, candidate) = (it.record.extrapolated.clone(), it.dir.join("candidate"));
            if candidate.exists() {
                if it.record.judged_advantage.is_some() && it.record.alpha == run.cfg.alpha {
                    return std::fs::rename(&candidate, &out).map_err(|e| prefopt_fs::FsError::io(&out, e).into());
                }
                std::fs::remove_dir_all(&candidate).map_err(|e| prefopt_fs::FsError::io(&candidate, e))?;
            }
            run.write_extrapolated(it, it.record.alpha, &out)
        })
    }

    /// `pi_hat_t + alpha (pi_hat_t - pi_hat_{t-1})` into `out`: on the weights, or with LoRA
    /// on the stacks' coefficients (the same step on the effective weights, exactly:
    /// [`extrapolate_stack`]).
    fn write_extrapolated(&self, it: &Iteration, alpha: f64, out: &Path) -> Result<(), LoopError> {
        let older_dir = self.trained(it.t - 1);
        if prefopt_model::stack::is_stack(&it.record.trained) {
            let (base, newer) = read_stack(&it.record.trained)?;
            let (older_base, older) = read_stack(&older_dir)?;
            // The coefficients combine only over one base (pi_hat_0 = the base itself).
            let same = |a: &Path, b: &Path| std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok();
            if !same(&older_base, &base) {
                return Err(LoopError::Config {
                    source_name: it.record.trained.display().to_string(),
                    message: format!(
                        "the stacks of pi_hat_t and pi_hat_(t-1) ({}) have different bases ({} and {}); \
                         they cannot be extrapolated",
                        older_dir.display(),
                        base.display(),
                        older_base.display()
                    ),
                });
            }
            save_stack_dir(out, &base, &extrapolate_stack(&newer, &older, alpha))?;
            return Ok(());
        }
        let trained = Policy::load(&it.record.trained, &self.device)?.merged()?;
        let older = Policy::load(&older_dir, &self.device)?.merged()?;
        let params = extrapolate(&trained.params, &older.params, alpha)?;
        save_model_dir(out, &trained.raw_config, &params, Some(&it.record.trained))?;
        Ok(())
    }

    /// Stage 6: evaluate `pi_hat_t` and `pi_t` on the held-out prompts.
    fn evaluate(&mut self, it: &mut Iteration, obs: &mut dyn LoopObserver) -> Result<(), LoopError> {
        if it.record.eval_trained.is_some() && it.record.eval_extrapolated.is_some() {
            return Ok(());
        }
        self.stage(it, "evaluation", obs, |run, it, obs| {
            let seed = seeds::loop_evaluation(run.cfg.seed);
            let mut evaluate = |dir: &Path| {
                evaluate_model(
                    dir,
                    &run.tok,
                    &run.eval_prompts,
                    &run.sampling,
                    seed,
                    run.judge.as_mut(),
                    &run.base,
                    &run.device,
                )
            };
            let trained = evaluate(&it.record.trained)?;
            // At alpha 0 the extrapolated weights are the trained ones, byte for byte (tested),
            // and the evaluation is seeded, so its numbers are the same: skip the second pass.
            let extrapolated =
                if it.record.alpha == 0.0 { trained.clone() } else { evaluate(&it.record.extrapolated)? };
            if let Some(stats) = run.judge.take_verdict_stats().filter(|s| s.failures > 0) {
                obs.message(&format!(
                    "iteration {}: {} of {} judge replies in evaluation were not a verdict (left out)",
                    it.t, stats.failures, stats.requests
                ));
            }
            let lines: Vec<serde_json::Value> = [("trained", &trained), ("extrapolated", &extrapolated)]
                .iter()
                .map(|(which, m)| {
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    v["iteration"] = it.t.into();
                    v["model"] = (*which).into();
                    v
                })
                .collect();
            prefopt_fs::write_jsonl(&it.dir.join("metrics.jsonl"), &lines)?;
            it.record.eval_trained = Some(trained);
            it.record.eval_extrapolated = Some(extrapolated);
            run.save(&it.record)?;
            for dir in [&it.record.trained, &it.record.extrapolated] {
                prefopt_fs::remove_file_if_exists(&crate::evaluate::eval_journal(dir))?;
            }
            Ok(())
        })
    }
}

/// `extrapolation = "logprob"`: writes `pairs` to `out` with the columns `ref_chosen_logps`
/// and `ref_rejected_logps` = `(1 + alpha) lp_newer - alpha lp_older`, tokenized as `train`
/// will tokenize them (rows it drops by truncation get no columns; it drops them again).
fn write_extrapolated_reference(
    train: &TrainConfig,
    pairs: &Path,
    newer: &Path,
    older: &Path,
    alpha: f64,
    out: &Path,
) -> Result<(), LoopError> {
    let (data, scores) = score_pair_file(train, pairs, &[newer.to_path_buf(), older.to_path_buf()])?;
    let combined = extrapolate_logps(&scores[0], &scores[1], alpha);
    let mut rows: Vec<serde_json::Value> = prefopt_fs::read_jsonl(pairs)?;
    for (&row, (w, l)) in data.rows.iter().zip(combined) {
        rows[row]["ref_chosen_logps"] = w.into();
        rows[row]["ref_rejected_logps"] = l.into();
    }
    Ok(prefopt_fs::write_jsonl(out, &rows)?)
}

/// The pairs of `pairs`, tokenized as `train` will tokenize them, and their summed
/// (chosen, rejected) log-probs under each model of `dirs`, in order.
fn score_pair_file(
    train: &TrainConfig,
    pairs: &Path,
    dirs: &[PathBuf],
) -> Result<(prefopt_train::dataset::PairDataset, Vec<prefopt_train::reference::RefLogps>), LoopError> {
    let device = train.device()?;
    let tok = HfTokenizer::from_dir(&train.model)?;
    // The judge's pairs carry no reference columns; these are computed from scratch.
    let data = prefopt_train::dataset::PairDataset::load(pairs, &tok, &train.tokenize_options())?;
    let layout = train.batch_layout(tok.padding_id());
    let mut scores = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let net = Policy::load(dir, &device)?.network(Mode::Infer, train.precision())?;
        scores.push(prefopt_train::reference::compute(&net, &data, train.batch_size, layout, |_| {})?);
    }
    Ok((data, scores))
}

/// `alpha_schedule = "monotone"`: the next iteration's samples from the candidate `pi_t` and
/// from `pi_hat_t`, in iteration t's folder.
const SAFEGUARD_EXTRAPOLATED: &str = "safeguard-extrapolated.jsonl";
const SAFEGUARD_TRAINED: &str = "safeguard-trained.jsonl";

/// Keys that change how a run is carried out but not its results: a resumed run may change
/// them (e.g. raise `judge_timeout_s` after a judge timed out, or move to a GPU).
const OPERATIONAL_KEYS: [&str; 13] = [
    "judge_timeout_s",
    "judge_api_key_env",
    "judge_concurrency",
    "judge_retries",
    "judge_backoff_s",
    "judge_max_failure_rate",
    "device",
    "sampler_url",
    "sampler_api_key_env",
    "sampler_concurrency",
    "sampler_timeout_s",
    "sampler_retries",
    "sampler_backoff_s",
];

/// Runs `work` on a thread of its own with a progress callback that its worker threads may
/// call, while this thread hands (done, total) to `report` on `obs` (a server's requests
/// finish on many threads; the observer draws on one).
fn with_progress<T: Send>(
    obs: &mut dyn LoopObserver,
    report: impl Fn(&mut dyn LoopObserver, usize, usize),
    work: impl FnOnce(crate::pairing::Progress) -> Result<T, LoopError> + Send,
) -> Result<T, LoopError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        // The sender lives in the work's thread: when it ends, the progress loop ends.
        let handle = s.spawn(move || {
            let mut send = move |d: usize, n: usize| {
                let _ = tx.send((d, n));
            };
            work(&mut send)
        });
        for (d, n) in rx {
            report(obs, d, n);
        }
        handle.join().unwrap_or_else(|_| {
            Err(LoopError::Config { source_name: "the loop".into(), message: "a worker thread panicked".into() })
        })
    })
}

fn without_operational_keys(config: &serde_json::Value) -> serde_json::Value {
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        for key in OPERATIONAL_KEYS {
            map.remove(key);
        }
    }
    config
}

/// Prompts from `task:<name>` (generated from `seed`) or a JSONL/Parquet file.
pub fn load_prompts(spec: &str, count: usize, seed: u64) -> Result<Vec<PromptItem>, LoopError> {
    let bad = |message: String| LoopError::Prompts { spec: spec.to_string(), message };
    if let Some(name) = spec.strip_prefix("task:") {
        let task = crate::tasks::task_by_name(name).map_err(|e| bad(e.to_string()))?;
        return Ok(task.prompts(count, seed));
    }
    let records = read_records(Path::new(spec))?;
    if records.is_empty() {
        return Err(bad("no prompts".into()));
    }
    records.iter().map(|r| Ok(PromptItem { text: parse_prompt(r)?, meta: serde_json::Value::Null })).collect()
}

/// A seeded shuffle of prompt indices; iteration t takes the t-th fold of it.
fn fold_order(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    order
}
