//! Training against plain PyTorch: 3 steps of each loss on the tiny fixtures must follow the
//! reference trajectory (fixtures/expected/train, made by scripts/make_train_fixtures.py),
//! plus gradient accumulation equal to the large batch and SPO's claim on a small run.

use std::path::Path;

use prefopt_model::{Mode, Precision};
use prefopt_train::config::LossTypes;
use prefopt_train::losses::LossType;
use prefopt_train::metrics::MetricsLog;
use prefopt_train::schedule::SchedulerKind;
use prefopt_train::spo::SpoSolver;
use prefopt_train::{train, Quiet, TrainConfig};

use crate::util::{device, device_name, fixtures};

/// The trajectory fixtures' setup: whole dataset as one batch, AdamW lr 1e-3, constant LR,
/// no clipping, no weight decay, no truncation.
pub(crate) fn parity_config(model: &str, out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models").join(model),
        train_data: fixtures().join("data/plain.jsonl"),
        output_dir: out.to_path_buf(),
        learning_rate: 1e-3,
        lr_scheduler_type: SchedulerKind::Constant,
        max_grad_norm: 0.0,
        batch_size: 12,
        max_steps: 3,
        max_length: 256,
        max_prompt_length: None,
        logging_steps: 1,
        save_steps: 0,
        device: device_name(),
        ..TrainConfig::default()
    }
}

fn run(cfg: &TrainConfig) -> Vec<serde_json::Value> {
    let summary = train(cfg, &mut Quiet).unwrap_or_else(|e| panic!("{e}"));
    MetricsLog::read_all(&summary.metrics_path)
}

fn check_trajectory(model: &str, fixture: &str, setup: impl FnOnce(&mut TrainConfig)) {
    let path = fixtures().join(format!("expected/train/traj_{model}__{fixture}.json"));
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = parity_config(model, tmp.path());
    setup(&mut cfg);
    let got = run(&cfg);
    let steps = want["steps"].as_array().unwrap();
    let steps64 = want["float64"]["steps"].as_array().unwrap();
    assert_eq!(got.len(), 3, "{fixture}: logged lines");
    for ((g, w), w64) in got.iter().zip(steps).zip(steps64) {
        // 1e-5 absolute, or 1e-5 relative for losses above 1 (sppo_hard reaches 254, where f32
        // cannot resolve 1e-5), or twice torch's own float32 error against its float64 run at
        // this step, whichever is largest: the reference is only that exact itself.
        let (gl, wl) = (g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
        let torch_f32_error = (wl - w64["loss"].as_f64().unwrap()).abs();
        let tolerance = (1e-5 * wl.abs().max(1.0)).max(2.0 * torch_f32_error);
        assert!(
            (gl - wl).abs() < tolerance,
            "{model} {fixture} step {}: loss {gl} vs torch {wl} (tolerance {tolerance})",
            w["step"]
        );
        let (gn, wn) = (g["grad_norm"].as_f64().unwrap(), w["grad_norm"].as_f64().unwrap());
        assert!(((gn - wn) / wn).abs() < 1e-4, "{model} {fixture} step {}: grad_norm {gn} vs torch {wn}", w["step"]);
        for key in ["logps/chosen", "logps/rejected"] {
            let (a, b) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!(((a - b) / b).abs() < 1e-4, "{model} {fixture} {key}: {a} vs {b}");
        }
    }
}

#[test]
fn dpo_family_trajectories_match_pytorch() {
    for model in ["llama-untied", "qwen2-tied"] {
        check_trajectory(model, "sigmoid", |_| {});
        check_trajectory(model, "ipo", |c| c.loss_type = LossTypes::One(LossType::Ipo));
        check_trajectory(model, "sppo_hard", |c| c.loss_type = LossTypes::One(LossType::SppoHard));
        check_trajectory(model, "robust", |c| {
            c.loss_type = LossTypes::One(LossType::Robust);
            c.label_smoothing = 0.1;
        });
        check_trajectory(model, "simpo", |c| {
            c.loss_type = LossTypes::One(LossType::Simpo);
            c.beta = 2.5;
            c.simpo_gamma = 1.375;
        });
        check_trajectory(model, "sigmoid+sft", |c| {
            c.loss_type = LossTypes::Many(vec![LossType::Sigmoid, LossType::Sft])
        });
    }
}

fn final_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let hf = prefopt_model::HfModel::load(dir, &device()).unwrap();
    hf.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

/// Plain SGD, so the weights show the accumulated gradient itself (Adam's normalization
/// would amplify float rounding of near-zero gradients).
#[test]
fn gradient_accumulation_equals_the_large_batch() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut big = parity_config("qwen2-tied", a.path());
    big.optimizer = prefopt_train::optim::OptimizerKind::Sgd;
    big.learning_rate = 1e-2;
    let mut small = big.clone();
    small.output_dir = b.path().to_path_buf();
    small.batch_size = 4;
    small.gradient_accumulation_steps = 3;
    let (gb, gs) = (run(&big), run(&small));
    for (x, y) in gb.iter().zip(&gs) {
        for key in ["loss", "grad_norm", "rewards/margins"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{key}: {p} vs {q}");
        }
    }
    for ((name, wa), (_, wb)) in
        final_weights(&a.path().join("final")).iter().zip(final_weights(&b.path().join("final")))
    {
        let diff = wa.iter().zip(&wb).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "{name}: max diff {diff}");
    }
}

/// A step's micro-batch runs as one shard per thread (`trainer::run_sharded`): with 1 thread
/// (one shard) and with 3 threads (shards of 4 pairs), the same run ends at the same weights up
/// to float rounding, and two runs with the same thread count are bit-identical.
#[test]
fn sharding_across_threads_equals_one_shard_and_is_deterministic() {
    let in_pool = |threads: usize, dir: &Path| {
        let mut cfg = parity_config("qwen2-tied", dir);
        cfg.optimizer = prefopt_train::optim::OptimizerKind::Sgd;
        cfg.learning_rate = 1e-2;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let metrics = pool.install(|| run(&cfg));
        (metrics, final_weights(&dir.join("final")))
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (m1, w1) = in_pool(1, dirs[0].path());
    let (m3, w3) = in_pool(3, dirs[1].path());
    let (m3b, w3b) = in_pool(3, dirs[2].path());
    for (x, y) in m1.iter().zip(&m3) {
        // (Not rewards/accuracies: at step 1 policy == reference, every margin is 0 up to
        // rounding, and the count of margins > 0 flips with it.)
        for key in ["loss", "grad_norm", "rewards/margins"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{key}: {p} vs {q}");
        }
    }
    for ((name, a), (_, b)) in w1.iter().zip(&w3) {
        let diff = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "{name}: max diff {diff}");
    }
    assert_eq!(m3, m3b, "same thread count: identical metrics");
    assert!(w3 == w3b, "same thread count: identical weights");
    // The sharded run did split: with one thread the whole batch is one shard, and float
    // rounding of 3 shards shows somewhere in the weights.
    assert!(w1 != w3, "3 threads ran the batch as one shard");
}

/// `gradient_checkpointing = true` recomputes each block in the backward pass: the same loss
/// and grad norm at every step (1e-6 relative), for DPO, SPO's dynamic solver (two backward
/// passes per forward) and SFT, and final weights within 1e-5 after 3 AdamW steps (a tied
/// embedding's two gradient parts are summed in another order, and Adam divides by the
/// root of tiny second moments; measured 1.6e-6).
#[test]
fn gradient_checkpointing_gives_the_same_trajectory() {
    type Setup = fn(&mut TrainConfig);
    let setups: [(&str, Setup); 2] = [
        ("sigmoid", |_| {}),
        ("spo dynamic", |c| {
            c.spo_lambda = 1.0;
            c.spo_solver = SpoSolver::Dynamic;
        }),
    ];
    for (name, setup) in setups {
        type Weights = Vec<(String, Vec<f32>)>;
        let runs: Vec<(Vec<serde_json::Value>, Weights)> = [false, true]
            .into_iter()
            .map(|checkpointing| {
                let tmp = tempfile::tempdir().unwrap();
                let mut cfg = parity_config("llama-tied", tmp.path());
                setup(&mut cfg);
                cfg.gradient_checkpointing = checkpointing;
                (run(&cfg), final_weights(&tmp.path().join("final")))
            })
            .collect();
        let ((plain, w_plain), (ckpt, w_ckpt)) = (&runs[0], &runs[1]);
        for (a, b) in plain.iter().zip(ckpt) {
            for key in ["loss", "grad_norm"] {
                let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-12), "{name}: {key} {x} vs {y} with checkpointing");
            }
        }
        for ((n, a), (_, b)) in w_plain.iter().zip(w_ckpt) {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "{name}: {n} differs by {diff} with checkpointing");
        }
    }
    // SFT on the preference file's prompts and chosen answers.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    let rows: String = std::fs::read_to_string(fixtures().join("data/plain.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}\n", serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}))
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let sft = |checkpointing: bool| {
        let cfg = TrainConfig {
            model: fixtures().join("models/qwen2-tied"),
            train_data: data.clone(),
            output_dir: tmp.path().join(format!("sft-{checkpointing}")),
            max_steps: 2,
            batch_size: 4,
            max_length: 256,
            save_steps: 0,
            logging_steps: 1,
            device: device_name(),
            gradient_checkpointing: checkpointing,
            ..TrainConfig::default()
        };
        let summary = prefopt_train::train_sft(&cfg, &mut Quiet).unwrap();
        MetricsLog::read_all(&summary.metrics_path)
    };
    for (a, b) in sft(false).iter().zip(&sft(true)) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-12), "sft: {key} {x} vs {y} with checkpointing");
        }
    }
}

/// `bf16 = true`: the run follows torch's f32 trajectory (fixture) within the bf16 tolerance
/// (loss within 1e-2 relative, grad norm within 2e-2 relative; measured values printed), and
/// the optimizer updates f32 master weights: some weights move by less than half a bf16 step,
/// which bf16 weights could not hold.
#[test]
fn bf16_weights_train_f32_master_weights_near_the_f32_trajectory() {
    let path = fixtures().join("expected/train/traj_qwen2-tied__sigmoid.json");
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = parity_config("qwen2-tied", tmp.path());
    cfg.bf16 = true;
    let got = run(&cfg);
    for (g, w) in got.iter().zip(want["steps"].as_array().unwrap()) {
        let rel = |key: &str| {
            let (a, b) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            ((a - b) / b).abs()
        };
        let (loss, norm) = (rel("loss"), rel("grad_norm"));
        println!("step {}: loss {loss:.1e}, grad_norm {norm:.1e} relative to torch f32", w["step"]);
        assert!(loss < 1e-2 && norm < 2e-2, "step {}: loss {loss}, grad_norm {norm} relative", w["step"]);
    }
    let before = final_weights(&fixtures().join("models/qwen2-tied"));
    let after = final_weights(&tmp.path().join("final"));
    let bf16_step = |w: f32| {
        let b = half::bf16::from_f32(w);
        (f32::from(half::bf16::from_bits(b.to_bits() + 1)) - f32::from(b)).abs()
    };
    let small_moves = before
        .iter()
        .zip(&after)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b))
        .filter(|(a, b)| *a != *b && (*a - *b).abs() < 0.5 * bf16_step(**a))
        .count();
    assert!(small_moves > 0, "no weight moved by less than half a bf16 step: the masters are not f32");
}

/// Evaluation after training sees the trained weights: `eval_logps/chosen` at the last step
/// equals the mean chosen log-prob under the saved final model.
#[test]
fn evaluation_uses_the_current_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = parity_config("llama-untied", tmp.path());
    cfg.eval_data = Some(cfg.train_data.clone());
    cfg.learning_rate = 1e-2;
    let logged = run(&cfg);
    let eval = logged.iter().rev().find(|l| l.get("eval_logps/chosen").is_some()).expect("an eval line");
    let model = tmp.path().join("final");
    let tok = prefopt_data::HfTokenizer::from_dir(&model).unwrap();
    let opts = cfg.tokenize_options();
    let data = prefopt_train::dataset::PairDataset::load(&cfg.train_data, &tok, &opts).unwrap();
    let net = prefopt_model::HfModel::load(&model, &device()).unwrap().build(Mode::Infer, Precision::F32).unwrap();
    let chosen: Vec<_> = data.pairs.iter().map(|p| &p.chosen).collect();
    let pad = tok.padding_id();
    let batch = prefopt_train::SequenceBatch::new(&chosen, pad, &device()).unwrap();
    let lp: Vec<f32> = prefopt_train::completion_logps(&net, &batch).unwrap().logps.to_vec1().unwrap();
    let want = lp.iter().map(|&v| v as f64).sum::<f64>() / lp.len() as f64;
    let got = eval["eval_logps/chosen"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "eval_logps/chosen {got}, final model {want}");
}

/// Near-duplicate pairs (the rejected answer repeats or extends the chosen one): the case
/// where DPO's likelihood displacement shows (methods.md section 4).
const NEAR_DUPLICATES: &str = r#"{"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 4 4"}
{"prompt": "Q: capital of France? A:", "chosen": " Paris", "rejected": " Paris."}
{"prompt": "Say hi.", "chosen": " hi", "rejected": " hi hi"}
{"prompt": "Name a color:", "chosen": " red", "rejected": " red!"}
{"prompt": "Q: 3+4? A:", "chosen": " 7", "rejected": " 7 7"}
{"prompt": "Name a fruit:", "chosen": " apple", "rejected": " apple,"}
{"prompt": "Count to two:", "chosen": " one two", "rejected": " one two two"}
{"prompt": "Q: 1+1? A:", "chosen": " 2", "rejected": " 2."}
"#;

/// methods.md section 4: with DPO the chosen log-prob falls below its start; with SPO (both
/// solvers) it does not, at comparable reward accuracy.
#[test]
fn spo_keeps_the_chosen_log_prob_where_dpo_lets_it_fall() {
    let data_dir = tempfile::tempdir().unwrap();
    let data = data_dir.path().join("near.jsonl");
    std::fs::write(&data, NEAR_DUPLICATES).unwrap();
    let setup = |out: &Path, spo: Option<SpoSolver>| {
        let mut cfg = parity_config("llama-untied", out);
        cfg.train_data = data.clone();
        cfg.max_steps = 10;
        cfg.learning_rate = 5e-3;
        if let Some(solver) = spo {
            cfg.spo_lambda = 1.0;
            cfg.spo_solver = solver;
        }
        run(&cfg)
    };
    let summary = |log: &[serde_json::Value]| {
        let first = log[0]["logps/chosen"].as_f64().unwrap();
        let last = log.last().unwrap();
        (last["logps/chosen"].as_f64().unwrap() - first, last["rewards/accuracies"].as_f64().unwrap())
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (dpo_delta, dpo_acc) = summary(&setup(dirs[0].path(), None));
    let (pen_delta, pen_acc) = summary(&setup(dirs[1].path(), Some(SpoSolver::Penalty)));
    let (dyn_delta, dyn_acc) = summary(&setup(dirs[2].path(), Some(SpoSolver::Dynamic)));
    eprintln!("logps/chosen change: dpo {dpo_delta:.3} (acc {dpo_acc}), spo penalty {pen_delta:.3} (acc {pen_acc}), spo dynamic {dyn_delta:.3} (acc {dyn_acc})");
    assert!(dpo_delta < 0.0, "DPO was expected to lower the chosen log-prob, changed by {dpo_delta}");
    assert!(pen_delta >= 0.0, "SPO (penalty) let the chosen log-prob fall by {pen_delta}");
    assert!(dyn_delta >= 0.0, "SPO (dynamic) let the chosen log-prob fall by {dyn_delta}");
    assert!(
        pen_acc >= dpo_acc - 0.25 && dyn_acc >= dpo_acc - 0.25,
        "accuracies: dpo {dpo_acc}, penalty {pen_acc}, dynamic {dyn_acc}"
    );
}
