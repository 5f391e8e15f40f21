//! KTO against TRL's formula and plain PyTorch (fixtures/expected/train/kto_crosscheck.json and
//! kto_traj_<model>.json, made by scripts/make_kto_fixtures.py): the loss lines on fixed
//! tensors, the unpaired tokens and mismatched pairs, and 3 steps of training.

use candle_core::{Device, Tensor};
use prefopt_data::HfTokenizer;
use prefopt_train::config::LossTypes;
use prefopt_train::kto::{kl_estimate, kto_losses, UnpairedDataset};
use prefopt_train::losses::LossType;
use prefopt_train::metrics::MetricsLog;
use prefopt_train::{train, Quiet, TrainConfig};

use crate::trajectory::parity_config;
use crate::util::fixtures;

fn json(name: &str) -> serde_json::Value {
    let path = fixtures().join("expected/train").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn kto_reproduces_trls_loss_lines_on_fixed_tensors() {
    let mut worst: f64 = 0.0;
    for case in json("kto_crosscheck.json")["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (pol, reference) = (floats(&case["policy"]), floats(&case["reference"]));
        let desirable: Vec<bool> = case["desirable"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let z0 = kl_estimate(&floats(&case["kl_policy"]), &floats(&case["kl_reference"]));
        assert!((z0 - case["kl"].as_f64().unwrap()).abs() < 1e-12, "{name}: kl {z0}");
        let ratios: Vec<f64> = pol.iter().zip(&reference).map(|(p, r)| p - r).collect();
        let ratios = Tensor::new(ratios, &Device::Cpu).unwrap();
        let f = |k: &str| case[k].as_f64().unwrap();
        let losses = kto_losses(&ratios, z0, &desirable, f("beta"), f("desirable_weight"), f("undesirable_weight"))
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (i, (got, want)) in losses.iter().zip(floats(&case["losses"])).enumerate() {
            assert!((got - want).abs() < 1e-6, "{name} row {i}: {got} vs TRL {want}");
            worst = worst.max((got - want).abs());
        }
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        assert!((mean - f("loss")).abs() < 1e-6, "{name}: loss {mean} vs TRL {}", f("loss"));
    }
    eprintln!("KTO cross-check: max |diff| {worst:.1e}");
}

fn kto_config(model: &str, out: &std::path::Path) -> TrainConfig {
    TrainConfig {
        train_data: fixtures().join("data/kto.jsonl"),
        loss_type: LossTypes::One(LossType::Kto),
        batch_size: 8,
        undesirable_weight: 1.33,
        ..parity_config(model, out)
    }
}

#[test]
fn unpaired_rows_and_mismatched_pairs_tokenize_as_trl_makes_them() {
    for model in ["qwen2-tied", "llama-untied"] {
        let want = json(&format!("kto_traj_{model}.json"));
        let tok = HfTokenizer::from_dir(&fixtures().join("models").join(model)).unwrap();
        let cfg = kto_config(model, std::path::Path::new("unused"));
        let data = UnpairedDataset::load(&cfg.train_data, &tok, &cfg.tokenize_options(), 8).unwrap();
        let rows = want["tokens"].as_array().unwrap();
        assert_eq!(data.len(), rows.len());
        for (i, row) in rows.iter().enumerate() {
            let (seq, kl) = (&data.seqs[i], &data.kl_seqs[i]);
            assert_eq!(seq.prompt_ids(), ids(&row["prompt"]), "{model} row {i} prompt");
            assert_eq!(seq.completion_ids(), ids(&row["completion"]), "{model} row {i} completion");
            assert_eq!(kl.prompt_ids(), ids(&row["prompt"]), "{model} row {i} KL prompt");
            assert_eq!(kl.completion_ids(), ids(&row["kl_completion"]), "{model} row {i} KL completion");
        }
    }
}

#[test]
fn kto_trajectories_match_pytorch() {
    for model in ["qwen2-tied", "llama-untied"] {
        let want = json(&format!("kto_traj_{model}.json"));
        let tmp = tempfile::tempdir().unwrap();
        let summary = train(&kto_config(model, tmp.path()), &mut Quiet).unwrap_or_else(|e| panic!("{e}"));
        let got = MetricsLog::read_all(&summary.metrics_path);
        let steps = want["steps"].as_array().unwrap();
        let steps64 = want["float64"]["steps"].as_array().unwrap();
        assert_eq!(got.len(), steps.len(), "{model}: logged lines");
        let (mut worst_loss, mut worst_norm) = (0f64, 0f64);
        for ((g, w), w64) in got.iter().zip(steps).zip(steps64) {
            let at = format!("{model} kto step {}", w["step"]);
            let value =
                |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{at}: no `{k}` in {v}"));
            let (gl, wl) = (value(g, "loss"), value(w, "loss"));
            let tolerance = 1e-5f64.max(2.0 * (wl - value(w64, "loss")).abs());
            assert!((gl - wl).abs() < tolerance, "{at}: loss {gl} vs torch {wl}");
            let (gn, wn) = (value(g, "grad_norm"), value(w, "grad_norm"));
            assert!(((gn - wn) / wn).abs() < 1e-4, "{at}: grad_norm {gn} vs torch {wn}");
            (worst_loss, worst_norm) = (worst_loss.max((gl - wl).abs()), worst_norm.max(((gn - wn) / wn).abs()));
            assert!((value(g, "kl") - value(w, "kl")).abs() < 1e-4, "{at}: kl {} vs {}", g["kl"], w["kl"]);
            for key in ["rewards/chosen", "rewards/rejected"] {
                assert!((value(g, key) - value(w, key)).abs() < 1e-5, "{at}: {key} {} vs {}", g[key], w[key]);
            }
            for key in ["logps/chosen", "logps/rejected"] {
                let (a, b) = (value(g, key), value(w, key));
                assert!(((a - b) / b).abs() < 1e-4, "{at}: {key} {a} vs {b}");
            }
            let margin = value(g, "rewards/chosen") - value(g, "rewards/rejected");
            assert!((value(g, "rewards/margins") - margin).abs() < 1e-9, "{at}: rewards/margins");
        }
        let kl: Vec<f64> = steps.iter().map(|s| s["kl"].as_f64().unwrap()).collect();
        assert!(kl.iter().any(|&k| k > 0.0), "{model}: the fixture must exercise a positive KL estimate: {kl:?}");
        eprintln!("{model} kto: |loss - torch| <= {worst_loss:.1e}, grad_norm relative <= {worst_norm:.1e}");
    }
}

#[test]
fn kto_refuses_paired_data_a_batch_of_one_and_mixed_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let paired =
        TrainConfig { train_data: fixtures().join("data/plain.jsonl"), ..kto_config("qwen2-tied", tmp.path()) };
    let e = train(&paired, &mut Quiet).err().unwrap().to_string();
    assert!(e.contains("plain.jsonl:1") && e.contains("paired data"), "{e}");
    let one = TrainConfig { batch_size: 1, ..kto_config("qwen2-tied", &tmp.path().join("one")) };
    let e = train(&one, &mut Quiet).err().unwrap().to_string();
    assert!(e.contains("batch_size") && e.contains("at least 2"), "{e}");
    let model = fixtures().join("models/qwen2-tied");
    let sets = [
        format!("model=\"{}\"", model.display()),
        "train_data=\"d.jsonl\"".into(),
        "output_dir=\"o\"".into(),
        "loss_type=[\"kto\", \"sft\"]".into(),
    ];
    let e = TrainConfig::load(None, &sets).unwrap_err().to_string();
    assert!(e.contains("`kto`") && e.contains("cannot be mixed"), "{e}");
}
