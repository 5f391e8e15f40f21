//! Models by Hugging Face name: `org/name[@revision]` resolves in the local cache
//! (`HF_HUB_CACHE`), offline, wherever a model folder is accepted.

use std::path::Path;

use crate::util::{failure, fixtures, ok, prefopt, read_jsonl};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A cache holding `fixtures/models/qwen2-tied` as `test-org/tiny` at `refs/main` and
/// `refs/v1`, laid out as huggingface_hub does.
fn cache(root: &Path) -> std::path::PathBuf {
    let repo = root.join("hub/models--test-org--tiny");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models/qwen2-tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for r in ["main", "v1"] {
        std::fs::write(repo.join("refs").join(r), COMMIT).unwrap();
    }
    root.join("hub")
}

fn score(cache: &Path, model: &str, out: &Path) -> std::process::Output {
    let data = fixtures().join("data/plain.jsonl");
    prefopt()
        .env("HF_HUB_CACHE", cache)
        .args(["score", "--model", model, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn a_hub_name_scores_like_its_folder_and_a_missing_one_says_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = cache(tmp.path());
    let by_path = tmp.path().join("by-path.jsonl");
    let folder = fixtures().join("models/qwen2-tied");
    ok(score(&hub, folder.to_str().unwrap(), &by_path));
    for name in ["test-org/tiny", "test-org/tiny@v1", &format!("test-org/tiny@{COMMIT}")] {
        let by_name = tmp.path().join("by-name.jsonl");
        ok(score(&hub, name, &by_name));
        assert_eq!(read_jsonl(&by_name), read_jsonl(&by_path), "{name}");
    }
    let err = failure(score(&hub, "test-org/absent", &tmp.path().join("x.jsonl")));
    assert!(err.contains("models--test-org--absent/refs/main") && err.contains("hf download test-org/absent"), "{err}");
    let err = failure(score(&hub, "test-org/tiny@v2", &tmp.path().join("x.jsonl")));
    assert!(err.contains("refs/v2") && err.contains("--revision v2"), "{err}");
    // A path that is not a name is a plain missing folder.
    let err = failure(score(&hub, "./no/such/dir", &tmp.path().join("x.jsonl")));
    assert!(err.contains("no such model folder"), "{err}");
}

#[test]
fn a_training_config_takes_a_hub_name() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = cache(tmp.path());
    let out = tmp.path().join("run");
    let data = fixtures().join("data/plain.jsonl");
    ok(prefopt()
        .env("HF_HUB_CACHE", &hub)
        .args(["train", "--set", "model=\"test-org/tiny\"", "--set", &format!("train_data=\"{}\"", data.display())])
        .args(["--set", &format!("output_dir=\"{}\"", out.display()), "--set", "max_steps=1", "--set", "batch_size=2"])
        .output()
        .unwrap());
    assert!(out.join("final/model.safetensors").is_file());
    // The saved folder says where the base came from, as transformers' `_name_or_path`.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(config["_name_or_path"], "test-org/tiny");
    // And a LoRA adapter's `base_model_name_or_path` names the hub model, as PEFT writes it.
    let lora = tmp.path().join("lora");
    ok(prefopt()
        .env("HF_HUB_CACHE", &hub)
        .args(["train", "--set", "model=\"test-org/tiny\"", "--set", &format!("train_data=\"{}\"", data.display())])
        .args(["--set", &format!("output_dir=\"{}\"", lora.display()), "--set", "max_steps=1", "--set", "batch_size=2"])
        .args(["--set", "use_peft=true"])
        .output()
        .unwrap());
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter["base_model_name_or_path"], "test-org/tiny");
}
