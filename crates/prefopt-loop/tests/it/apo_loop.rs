//! The APO loop end to end on a tiny fixture model: the saved weights obey the
//! extrapolation identity, alpha = 0 is iterative DPO (extrapolated == trained), the layout
//! and manifest are complete, and a rerun resumes instead of redoing finished stages.

use std::path::{Path, PathBuf};

use candle_core::Device;
use prefopt_loop::apo::{run_apo, ApoConfig, LoopObserver};
use prefopt_model::HfModel;

use crate::util::{fixtures, Silent};

/// A judge command that scores the i-th completion i (1-based): deterministic, never tied.
pub(crate) const RANK_JUDGE: &str = r#"cmd:awk -F'","' '{printf "{\"scores\": ["; for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "," : ""), i; print "]}"}'"#;

pub(crate) fn config(out: &Path, alpha: f64) -> ApoConfig {
    let prompts = out.with_extension("prompts.jsonl");
    let rows: String = ["What is 2 + 2?", "Name a color.", "Say hello.", "Count to three.", "What is 10 - 3?"]
        .iter()
        .map(|p| format!("{{\"prompt\": \"{p}\"}}\n"))
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let train: toml::Table = toml::from_str(
        "learning_rate = 1e-3\nmax_steps = 2\nbatch_size = 4\nlr_scheduler_type = \"constant\"\nlogging_steps = 1\nsave_steps = 0\nmax_length = 128",
    )
    .unwrap();
    ApoConfig {
        model: fixtures().join("models/qwen2-tied"),
        prompts: prompts.display().to_string(),
        judge: RANK_JUDGE.into(),
        iterations: 3,
        prompts_per_iteration: 4,
        num_samples: 3,
        alpha,
        max_new_tokens: 8,
        num_eval_prompts: 5,
        output_dir: out.to_path_buf(),
        train,
        ..ApoConfig::default()
    }
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let hf = HfModel::load(dir, &Device::Cpu).unwrap();
    hf.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

#[test]
fn saved_weights_satisfy_the_extrapolation_identity_over_three_iterations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("apo");
    let manifest = run_apo(&config(&out, 0.3), &mut Silent).unwrap();
    assert_eq!(manifest.iterations.len(), 3);
    let mut previous = weights(&fixtures().join("models/qwen2-tied"));
    for t in 1..=3 {
        let dir = out.join(format!("iter-{t}"));
        for f in [
            "samples.jsonl",
            "pairs.jsonl",
            "metrics.jsonl",
            "trained/model.safetensors",
            "extrapolated/model.safetensors",
        ] {
            assert!(dir.join(f).exists(), "iter-{t}/{f} missing");
        }
        let trained = weights(&dir.join("trained"));
        let extrapolated = weights(&dir.join("extrapolated"));
        let mut worst = 0f64;
        for (((name, tr), (_, ex)), (_, prev)) in trained.iter().zip(&extrapolated).zip(&previous) {
            for ((a, b), c) in tr.iter().zip(ex).zip(prev) {
                let want = *a as f64 + 0.3 * (*a as f64 - *c as f64);
                let rel = (*b as f64 - want).abs() / want.abs().max(1e-3);
                worst = worst.max(rel);
                assert!(rel < 1e-6, "iter {t} {name}: {b} vs {want}");
            }
        }
        assert!(trained != previous, "iteration {t} did not train");
        eprintln!("iteration {t}: max relative error of the extrapolation identity {worst:.2e}");
        previous = trained;
        let record = &manifest.iterations[t - 1];
        assert_eq!(record.pair_count, 4);
        assert!(record.eval_trained.is_some() && record.eval_extrapolated.is_some());
    }
    assert!(manifest.base_eval.is_some());

    // Rerunning the same config finds every stage done and changes nothing.
    let before = std::fs::read(out.join("iter-3/extrapolated/model.safetensors")).unwrap();
    let again = run_apo(&config(&out, 0.3), &mut Silent).unwrap();
    assert_eq!(again.iterations.len(), 3);
    assert_eq!(before, std::fs::read(out.join("iter-3/extrapolated/model.safetensors")).unwrap());
    // Another config in the same folder is refused.
    assert!(run_apo(&config(&out, 0.6), &mut Silent).is_err());
}

#[test]
fn alpha_zero_is_iterative_dpo_extrapolated_equals_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo");
    let mut cfg = config(&out, 0.0);
    cfg.iterations = 2;
    run_apo(&cfg, &mut Silent).unwrap();
    for t in 1..=2 {
        let dir = out.join(format!("iter-{t}"));
        assert_eq!(
            std::fs::read(dir.join("trained/model.safetensors")).unwrap(),
            std::fs::read(dir.join("extrapolated/model.safetensors")).unwrap(),
            "iteration {t}"
        );
    }
}

#[test]
fn judge_failures_are_clear_errors_and_keep_finished_stages() {
    let tmp = tempfile::tempdir().unwrap();
    // One score per prompt: the held-out evaluation (one completion each) passes, pairing
    // (three completions each) does not.
    let out = tmp.path().join("count");
    let mut cfg = config(&out, 0.3);
    cfg.judge = r#"cmd:awk '{print "{\"scores\": [1]}"}'"#.into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("returned 1 scores for 3 completions"), "{err}");
    assert!(out.join("iter-1/samples.jsonl").exists(), "the finished sampling stage was lost");

    let mut cfg = config(&tmp.path().join("crash"), 0.3);
    cfg.judge = "cmd:echo boom >&2; exit 3".into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("exit") && err.contains("boom"), "{err}");

    let mut cfg = config(&tmp.path().join("nan"), 0.3);
    cfg.judge = r#"cmd:awk '{print "{\"scores\": [\"x\"]}"}'"#.into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("not a finite number"), "{err}");

    let mut cfg = config(&tmp.path().join("empty"), 0.3);
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    cfg.prompts = empty.display().to_string();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("empty.jsonl") && err.contains("no prompts"), "{err}");
}

/// A judge scoring the i-th of K completions `min(i, 2)`: for K = 3 the scores are 1, 2, 2,
/// so the chosen sample ties one other (win probability 3/4) and the rejected loses to both (0).
const TIED_JUDGE: &str = r#"cmd:awk -F'","' '{printf "{\"scores\": ["; for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "," : ""), (i < 2 ? i : 2); print "]}"}'"#;

/// (lp(chosen), lp(rejected)) of every row of a pairs file under `model`, tokenized as the
/// loop's training does here.
fn pair_logps(model: &Path, pairs: &Path) -> Vec<(f64, f64)> {
    let opts =
        prefopt_data::TokenizeOptions { max_length: Some(128), max_prompt_length: Some(512), ..Default::default() };
    crate::util::pair_logps(model, pairs, &opts)
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn logprob_extrapolation_trains_against_the_two_last_trained_models() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logprob");
    let mut cfg = config(&out, 0.3);
    cfg.iterations = 3;
    cfg.extrapolation = prefopt_loop::apo::Extrapolation::Logprob;
    cfg.train.insert("logging_steps".into(), 1.into());
    let manifest = run_apo(&cfg, &mut Silent).unwrap();
    let base = fixtures().join("models/qwen2-tied");
    // Iteration 1: the reference is the base, as in `parameter` mode (no columns).
    assert!(manifest.iterations[0].reference_pairs.is_none());
    assert!(!out.join("iter-1/pairs-ref.jsonl").exists());
    for t in 2..=3 {
        let dir = out.join(format!("iter-{t}"));
        let rows = jsonl(&dir.join("pairs-ref.jsonl"));
        assert_eq!(manifest.iterations[t - 1].reference_pairs.as_deref(), Some(dir.join("pairs-ref.jsonl").as_path()));
        // The columns are (1 + alpha) lp(pi_hat_{t-1}) - alpha lp(pi_hat_{t-2}), pi_hat_0 = base.
        let newer = out.join(format!("iter-{}/trained", t - 1));
        let older = if t == 2 { base.clone() } else { out.join(format!("iter-{}/trained", t - 2)) };
        let (n, o) = (pair_logps(&newer, &dir.join("pairs.jsonl")), pair_logps(&older, &dir.join("pairs.jsonl")));
        for (i, row) in rows.iter().enumerate() {
            for (col, k) in [("ref_chosen_logps", 0), ("ref_rejected_logps", 1)] {
                let pick = |p: (f64, f64)| if k == 0 { p.0 } else { p.1 };
                let want = 1.3 * pick(n[i]) - 0.3 * pick(o[i]);
                let got = row[col].as_f64().unwrap();
                assert!((got - want).abs() < 1e-4, "iter {t} row {i} {col}: {got} vs {want}");
            }
        }
        // Training read them: step 1's `rewards/chosen` is beta * mean(lp_start(y_w) - column),
        // with lp_start under the parameter-extrapolated start (which `parameter` mode also
        // uses as its reference, giving exactly 0 there).
        let start = pair_logps(&out.join(format!("iter-{}/extrapolated", t - 1)), &dir.join("pairs.jsonl"));
        let want = 0.1
            * (0..rows.len()).map(|i| start[i].0 - rows[i]["ref_chosen_logps"].as_f64().unwrap()).sum::<f64>()
            / rows.len() as f64;
        let first = &jsonl(&dir.join("train/metrics.jsonl"))[0];
        let got = first["rewards/chosen"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "iter {t}: rewards/chosen {got} vs {want}");
        assert!(want.abs() > 1e-4, "iter {t}: the two references do not differ here ({want})");
    }
}

/// `extrapolation = "logprob"` drops `log Z'(x)`, exact only for losses a prompt-only shift of
/// the reference leaves unchanged (methods.md section 3); the others are refused before
/// anything runs, with the reason, unless alpha = 0 (then `Z' = 1`).
#[test]
fn logprob_extrapolation_refuses_losses_where_the_normalizer_does_not_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("apo.toml");
    let model = fixtures().join("models/qwen2-tied");
    std::fs::write(
        &path,
        format!(
            "model = {:?}\nprompts = \"task:arithmetic\"\njudge = \"arithmetic\"\noutput_dir = \"o\"\nextrapolation = \"logprob\"\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let load = |sets: &[&str]| ApoConfig::load(Some(&path), &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for loss in ["ipo", "sppo", "sppo_hard", "nca_pair", "dpop"] {
        let err = load(&[&format!("train.loss_type=\"{loss}\"")]).unwrap_err().to_string();
        assert!(err.contains(&format!("`train.loss_type` `{loss}`")) && err.contains("log Z'"), "{loss}: {err}");
        // A list is checked entry by entry.
        let err = load(&[&format!("train.loss_type=[\"sigmoid\", \"{loss}\"]")]).unwrap_err().to_string();
        assert!(err.contains(loss), "{err}");
        // The same loss is fine with parameter extrapolation or without momentum.
        load(&[&format!("train.loss_type=\"{loss}\""), "extrapolation=\"parameter\""]).unwrap();
        load(&[&format!("train.loss_type=\"{loss}\""), "alpha=0.0"]).unwrap();
    }
    // Each iteration trains a fresh adapter over pi_{t-1}; continuing one is refused.
    let err = load(&["train.adapter=\"some/adapter\""]).unwrap_err().to_string();
    assert!(err.contains("`train.adapter` is set by the loop itself"), "{err}");
    let err = load(&["train.spo_lambda=1.0"]).unwrap_err().to_string();
    assert!(err.contains("`train.spo_lambda`") && err.contains("safe-region"), "{err}");
    for loss in ["sigmoid", "robust", "hinge", "simpo", "sft"] {
        load(&[&format!("train.loss_type=\"{loss}\"")]).unwrap();
    }
    load(&["train.label_smoothing=0.1"]).unwrap();
    // A config built in code is checked by run_apo before any stage runs.
    let out = tmp.path().join("ipo");
    let mut cfg = config(&out, 0.3);
    cfg.extrapolation = prefopt_loop::apo::Extrapolation::Logprob;
    cfg.train.insert("loss_type".into(), "ipo".into());
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("`ipo`") && err.contains("log Z'"), "{err}");
    assert!(!out.join("iter-1").exists());
}

#[test]
fn sppo_trains_on_the_loops_win_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sppo");
    let mut cfg = config(&out, 0.3);
    cfg.iterations = 1;
    cfg.judge = TIED_JUDGE.into();
    cfg.beta = prefopt_loop::apo::BetaSchedule::One(1.0);
    cfg.train = toml::from_str(
        "loss_type = \"sppo\"\nlearning_rate = 1e-2\nmax_steps = 150\nbatch_size = 4\nlogging_steps = 50\nsave_steps = 0\nmax_length = 128",
    )
    .unwrap();
    let manifest = run_apo(&cfg, &mut Silent).unwrap();
    let pairs = out.join("iter-1/pairs.jsonl");
    let rows = jsonl(&pairs);
    assert_eq!(rows.len(), 4);
    let trained = pair_logps(&manifest.iterations[0].trained, &pairs);
    let reference = pair_logps(&fixtures().join("models/qwen2-tied"), &pairs);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!((row["win_prob_chosen"].as_f64(), row["win_prob_rejected"].as_f64()), (Some(0.75), Some(0.0)));
        // SPPO's minimizer: rho = lp - lp_ref = (p - 1/2) / beta for each response; the hard
        // variant would aim the chosen at +0.5 instead of +0.25.
        let rho_w = trained[i].0 - reference[i].0;
        let rho_l = trained[i].1 - reference[i].1;
        eprintln!("pair {i}: rho_w {rho_w:.4} (target 0.25), rho_l {rho_l:.4} (target -0.5)");
        assert!((rho_w - 0.25).abs() < 0.05 && (rho_l + 0.5).abs() < 0.05, "pair {i}: rho {rho_w:.3}, {rho_l:.3}");
    }
}

#[test]
fn judge_timeout_is_a_config_key_and_a_rerun_may_raise_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("slow");
    let marker = tmp.path().join("slow-judge");
    let mut cfg = config(&out, 0.3);
    cfg.iterations = 1;
    // Fast for the base's evaluation; slow (1 s) from iteration 1's judging on.
    cfg.judge =
        format!("cmd:if [ -e {} ]; then sleep 1; fi; {}", marker.display(), RANK_JUDGE.trim_start_matches("cmd:"));
    cfg.judge_timeout_s = 0.5;
    let mut obs = Breaker { marker: Some(marker), at: (1, "judging"), stages: vec![] };
    let err = run_apo(&cfg, &mut obs).unwrap_err().to_string();
    assert!(err.contains("sleep 1; fi; awk") && err.contains("timed out after 0.5 s"), "{err}");
    let samples = std::fs::read(out.join("iter-1/samples.jsonl")).unwrap();
    // The timeout does not change results: the same run, resumed with a longer one, finishes
    // from where it stopped.
    cfg.judge_timeout_s = 60.0;
    let mut obs = Breaker { marker: None, at: (0, ""), stages: vec![] };
    let manifest = run_apo(&cfg, &mut obs).unwrap();
    assert_eq!(obs.stages.first(), Some(&(1, "judging".to_string())), "{:?}", obs.stages);
    assert_eq!(samples, std::fs::read(out.join("iter-1/samples.jsonl")).unwrap());
    assert_eq!(manifest.iterations.len(), 1);
    assert_eq!(manifest.config["judge_timeout_s"], 60.0);
    // Other keys still may not change.
    cfg.alpha = 0.5;
    assert!(run_apo(&cfg, &mut obs).unwrap_err().to_string().contains("another config"));

    assert_eq!(ApoConfig::default().judge_timeout_s, 300.0);
    let path = tmp.path().join("apo.toml");
    let model = fixtures().join("models/qwen2-tied").display().to_string();
    let text = format!("model = {model:?}\nprompts = \"task:arithmetic\"\njudge = \"cmd:x\"\noutput_dir = \"o\"\n");
    std::fs::write(&path, text).unwrap();
    let set = |v: &str| ApoConfig::load(Some(&path), &[format!("judge_timeout_s={v}")]);
    assert_eq!(set("12.5").unwrap().judge_timeout_s, 12.5);
    let err = set("0").unwrap_err().to_string();
    assert!(err.contains("apo.toml") && err.contains("`judge_timeout_s` must be a positive number"), "{err}");
}

#[test]
fn a_model_folder_without_a_tokenizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("no-tokenizer");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixtures().join("models/qwen2-tied").join(f), model.join(f)).unwrap();
    }
    let mut cfg = config(&tmp.path().join("out"), 0.3);
    cfg.model = model.clone();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(err.contains(&model.display().to_string()) && err.contains("tokenizer"), "{err}");
}

#[test]
fn nan_scores_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(&tmp.path().join("nan"), 0.3);
    cfg.judge = r#"cmd:awk '{print "{\"scores\": [NaN]}"}'"#.into();
    let err = run_apo(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(
        err.contains("awk")
            && err.contains("prompt 0 (reply line 1)")
            && err.contains("NaN and Infinity are not JSON numbers"),
        "{err}"
    );
}

/// Records the stages it hears, and changes the judge's behaviour (creates `marker`) when
/// stage `at` starts.
struct Breaker {
    marker: Option<PathBuf>,
    at: (usize, &'static str),
    stages: Vec<(usize, String)>,
}
impl prefopt_train::Observer for Breaker {}
impl LoopObserver for Breaker {
    fn stage(&mut self, iteration: usize, stage: &str) {
        self.stages.push((iteration, stage.to_string()));
        if let Some(marker) = self.marker.as_ref().filter(|_| (iteration, stage) == self.at) {
            std::fs::write(marker, "").unwrap();
        }
    }
}

#[test]
fn a_judge_failing_mid_run_loses_no_finished_stage_and_the_rerun_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("resume");
    let marker = tmp.path().join("broken");
    let mut cfg = config(&out, 0.3);
    cfg.iterations = 2;
    cfg.judge = format!(
        "cmd:if [ -e {} ]; then echo judge is broken >&2; exit 7; fi; {}",
        marker.display(),
        RANK_JUDGE.trim_start_matches("cmd:")
    );
    let mut first = Breaker { marker: Some(marker.clone()), at: (2, "judging"), stages: vec![] };
    let err = run_apo(&cfg, &mut first).unwrap_err().to_string();
    assert!(err.contains("judge is broken") && err.contains("exit"), "{err}");
    let trained_1 = std::fs::read(out.join("iter-1/trained/model.safetensors")).unwrap();
    let samples_2 = std::fs::read(out.join("iter-2/samples.jsonl")).unwrap();
    assert!(!out.join("iter-2/pairs.jsonl").exists());

    std::fs::remove_file(&marker).unwrap();
    let mut second = Breaker { marker: None, at: (0, ""), stages: vec![] };
    let manifest = run_apo(&cfg, &mut second).unwrap();
    assert_eq!(second.stages.first(), Some(&(2, "judging".to_string())), "{:?}", second.stages);
    assert_eq!(manifest.iterations.len(), 2);
    assert!(manifest.iterations.iter().all(|r| r.eval_trained.is_some()));
    assert_eq!(trained_1, std::fs::read(out.join("iter-1/trained/model.safetensors")).unwrap());
    assert_eq!(samples_2, std::fs::read(out.join("iter-2/samples.jsonl")).unwrap());
}

#[test]
fn the_restart_schedule_records_its_signal_and_extrapolates_with_the_alpha_it_chose() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("restart");
    let mut cfg = config(&out, 0.6);
    cfg.alpha_schedule = prefopt_loop::apo::AlphaSchedule::Restart;
    let manifest = run_apo(&cfg, &mut Silent).unwrap();
    let first = &manifest.iterations[0];
    assert_eq!((first.alpha, first.momentum_agreement), (0.6, None), "t = 1: step and momentum are the same");
    for t in 2..=3 {
        let record = &manifest.iterations[t - 1];
        let agreement = record.momentum_agreement.expect("t >= 2 records its signal");
        assert_eq!(record.alpha, if agreement < 0.0 { 0.0 } else { 0.6 }, "iteration {t}");
        // The signal from the three models' log-probs of the pairs, computed here.
        let dir = |name: &str| out.join(name);
        let pairs = dir(&format!("iter-{t}/pairs.jsonl"));
        let hat = pair_logps(&dir(&format!("iter-{t}/trained")), &pairs);
        let reference = pair_logps(&dir(&format!("iter-{}/extrapolated", t - 1)), &pairs);
        let older = pair_logps(&dir(&format!("iter-{}/trained", t - 1)), &pairs);
        let want: f64 = hat
            .iter()
            .zip(&reference)
            .zip(&older)
            .map(|((h, r), o)| ((h.0 - r.0) - (h.1 - r.1)) * ((h.0 - o.0) - (h.1 - o.1)))
            .sum();
        assert!((agreement - want).abs() <= 1e-3 * want.abs().max(1e-6), "iteration {t}: {agreement} vs {want}");
        if record.alpha == 0.0 {
            assert_eq!(
                std::fs::read(dir(&format!("iter-{t}/trained/model.safetensors"))).unwrap(),
                std::fs::read(dir(&format!("iter-{t}/extrapolated/model.safetensors"))).unwrap(),
                "a restarted iteration's extrapolated model is its trained one"
            );
        }
        eprintln!("iteration {t}: agreement {agreement:.3e}, alpha {}", record.alpha);
    }
}

/// A judge command that prefers short completions: each completion's score is minus the
/// length of its field in the JSON line (the same offsets for every model on a prompt).
const SHORT_JUDGE: &str = r#"cmd:awk -F'","' '{printf "{\"scores\": ["; for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "," : ""), -length($i); print "]}"}'"#;

#[test]
fn the_monotone_schedule_keeps_only_extrapolations_judged_at_least_as_good_and_reuses_their_samples() {
    use prefopt_loop::sampling::SampleRecord;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("monotone");
    let mut cfg = config(&out, 0.6);
    cfg.judge = SHORT_JUDGE.into();
    cfg.alpha_schedule = prefopt_loop::apo::AlphaSchedule::Monotone;
    let manifest = run_apo(&cfg, &mut Silent).unwrap();
    let mut judge = prefopt_loop::judge::judge_from_spec(SHORT_JUDGE, &Device::Cpu).unwrap();
    let mut constant_so_far = true;
    let mut constant = cfg.clone();
    constant.alpha_schedule = prefopt_loop::apo::AlphaSchedule::Constant;
    constant.output_dir = tmp.path().join("constant");
    run_apo(&constant, &mut Silent).unwrap();
    for t in 1..=3 {
        let record = &manifest.iterations[t - 1];
        let dir = out.join(format!("iter-{t}"));
        let advantage = record.judged_advantage.expect("every iteration judges its candidate");
        assert_eq!(record.alpha, if advantage < 0.0 { 0.0 } else { 0.6 }, "iteration {t}");
        // The recorded advantage is the judge's mean score difference of the kept samples.
        let mut mean = |file: &str| {
            let path = dir.join(file);
            let samples: Vec<SampleRecord> = prefopt_fs::read_jsonl(&path).unwrap();
            prefopt_loop::pairing::mean_score(judge.as_mut(), &samples, &path, 3, &mut |_, _| {}).unwrap()
        };
        let want = mean("safeguard-extrapolated.jsonl") - mean("safeguard-trained.jsonl");
        assert!((advantage - want).abs() < 1e-12, "iteration {t}: {advantage} vs {want}");
        assert!(!dir.join("candidate").exists(), "the candidate is renamed or removed");
        let (trained, extrapolated) = (weights(&dir.join("trained")), weights(&dir.join("extrapolated")));
        if record.alpha == 0.0 {
            assert_eq!(trained, extrapolated, "a dropped candidate leaves pi_t = pi_hat_t");
        } else {
            // Kept: the extrapolation identity with pi_hat_(t-1).
            let older =
                if t == 1 { fixtures().join("models/qwen2-tied") } else { out.join(format!("iter-{}/trained", t - 1)) };
            for (((name, new), (_, old)), (_, ext)) in trained.iter().zip(&weights(&older)).zip(&extrapolated) {
                for ((n, o), e) in new.iter().zip(old).zip(ext) {
                    assert!((e - (n + 0.6 * (n - o))).abs() <= 1e-5 * (1.0 + n.abs()), "{name} at iteration {t}");
                }
            }
        }
        if t < 3 {
            // The next iteration trains on the chosen model's judged samples, byte for byte.
            let chosen = if record.alpha == 0.0 { "safeguard-trained.jsonl" } else { "safeguard-extrapolated.jsonl" };
            let next = out.join(format!("iter-{}/samples.jsonl", t + 1));
            assert_eq!(std::fs::read(dir.join(chosen)).unwrap(), std::fs::read(&next).unwrap(), "iteration {t}");
            // While every candidate so far was kept, the run is the constant schedule's, and the
            // reused samples are what sampling pi_t gives.
            constant_so_far &= record.alpha == 0.6;
            if constant_so_far {
                let other = constant.output_dir.join(format!("iter-{}/samples.jsonl", t + 1));
                assert_eq!(std::fs::read(&next).unwrap(), std::fs::read(other).unwrap(), "iteration {t}");
            }
        }
        eprintln!("iteration {t}: judged advantage {advantage:.3}, alpha {}", record.alpha);
    }
    // Iteration 1 is the constant run's, so its candidate is the constant run's pi_1, whose
    // samples of fold 2 are the constant run's iteration-2 samples, byte for byte.
    assert_eq!(
        std::fs::read(out.join("iter-1/safeguard-extrapolated.jsonl")).unwrap(),
        std::fs::read(constant.output_dir.join("iter-2/samples.jsonl")).unwrap()
    );
    // A rerun finds every stage done.
    let again = run_apo(&cfg, &mut Silent).unwrap();
    let alphas = |m: &prefopt_loop::apo::Manifest| m.iterations.iter().map(|r| r.alpha).collect::<Vec<_>>();
    assert_eq!(alphas(&again), alphas(&manifest));
}
