//! The shipped example configs run as documented (on the fixtures, with short lengths).

use std::path::Path;

use crate::util::{ok, prefopt, read_jsonl};

/// `examples/apo-paper.toml`, the APO paper's recipe, runs its three iterations with the
/// paper's beta schedule, RMSprop and the linear schedule with warm-up.
#[test]
fn the_apo_paper_recipe_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("apo-paper");
    ok(prefopt()
        .current_dir(&root)
        .args(["apo", "--config", "examples/apo-paper.toml"])
        .args(["--set", "prompts_per_iteration=16", "--set", "max_new_tokens=16", "--set", "num_eval_prompts=8"])
        .args(["--set", &format!("output_dir=\"{}\"", out.display())])
        .output()
        .unwrap());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let betas: Vec<f64> =
        manifest["iterations"].as_array().unwrap().iter().map(|it| it["beta"].as_f64().unwrap()).collect();
    assert_eq!(betas, [0.01, 0.1, 1.0]);
    for t in 1..=3 {
        assert!(out.join(format!("iter-{t}/trained/model.safetensors")).is_file());
        let metrics = read_jsonl(&out.join(format!("iter-{t}/train/metrics.jsonl")));
        assert!(!metrics.is_empty(), "iteration {t} logged no training step");
    }
}
