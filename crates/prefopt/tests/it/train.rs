//! `prefopt train` end to end with the real binary: exact resume after SIGKILL, the
//! reference log-prob cache, NaN handling, and bad input.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{failure, fixtures, ok, prefopt, read};

/// A small run on the qwen2 fixture; `extra` are further `--set` overrides.
fn train_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = prefopt();
    cmd.arg("train");
    let base = [
        format!("model=\"{}\"", fixtures().join("models/qwen2-tied").display()),
        format!("train_data=\"{}\"", fixtures().join("data/plain.jsonl").display()),
        format!("output_dir=\"{}\"", out.display()),
        "learning_rate=1e-3".into(),
        "batch_size=4".into(),
        "logging_steps=1".into(),
        "max_length=256".into(),
    ];
    for s in base.iter().map(String::as_str).chain(extra.iter().copied()) {
        cmd.args(["--set", s]);
    }
    cmd
}

#[test]
fn a_run_killed_with_sigkill_and_resumed_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    let settings = ["max_steps=40", "save_steps=3"];
    ok(train_cmd(&whole, &settings).output().unwrap());

    let mut child = train_cmd(&killed, &settings).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("checkpoint-6/trainer_state.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("final").exists(), "the run finished before it could be killed");

    let resumed = ok(train_cmd(&killed, &settings).arg("--resume").output().unwrap());
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
    assert_eq!(read(&whole.join("metrics.jsonl")), read(&killed.join("metrics.jsonl")), "metrics differ after resume");
    let weights = |dir: &Path| std::fs::read(dir.join("final/model.safetensors")).unwrap();
    assert!(weights(&whole) == weights(&killed), "final weights differ after resume");
}

#[test]
fn cached_reference_log_probs_skip_the_reference_model_on_the_second_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = format!("cache_dir=\"{}\"", tmp.path().join("cache").display());
    let settings = ["max_steps=2", "precompute_ref_log_probs=true", cache.as_str()];
    let first = ok(train_cmd(&tmp.path().join("a"), &settings).output().unwrap());
    let first_err = String::from_utf8_lossy(&first.stderr);
    assert!(first_err.contains("reference log-probs cached at"), "{first_err}");
    let second = ok(train_cmd(&tmp.path().join("b"), &settings).output().unwrap());
    let second_err = String::from_utf8_lossy(&second.stderr);
    assert!(
        second_err.contains("loaded from cache") && second_err.contains("no reference forward passes"),
        "{second_err}"
    );
    assert_eq!(read(&tmp.path().join("a/metrics.jsonl")), read(&tmp.path().join("b/metrics.jsonl")));
    // Another max_length is another key: computed again.
    let third = ok(train_cmd(&tmp.path().join("c"), &[settings[0], settings[1], settings[2], "max_length=200"])
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&third.stderr).contains("cached at"));
}

#[test]
fn training_writes_metrics_with_trl_names_a_loadable_model_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let eval = format!("eval_data=\"{}\"", fixtures().join("data/plain.jsonl").display());
    let done = ok(train_cmd(
        &out,
        &["max_steps=3", eval.as_str(), "eval_steps=2", "loss_type=[\"sigmoid\", \"sft\"]", "spo_lambda=0.5"],
    )
    .output()
    .unwrap());
    // TRL's closing figures: on stderr and in train_results.json.
    assert!(String::from_utf8_lossy(&done.stderr).contains("train_samples_per_second"));
    let results: serde_json::Value = serde_json::from_str(&read(&out.join("train_results.json"))).unwrap();
    let (runtime, samples, steps) = (
        results["train_runtime"].as_f64().unwrap(),
        results["train_samples_per_second"].as_f64().unwrap(),
        results["train_steps_per_second"].as_f64().unwrap(),
    );
    assert!(runtime > 0.0 && (steps * runtime - 3.0).abs() < 1e-6, "{results}");
    assert!((samples / steps - 4.0).abs() < 1e-6, "4 examples per step: {results}");
    assert!(results["train_loss"].as_f64().unwrap().is_finite());
    let lines: Vec<serde_json::Value> =
        read(&out.join("metrics.jsonl")).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train_line = &lines[0];
    for key in [
        "step",
        "epoch",
        "loss",
        "grad_norm",
        "learning_rate",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "num_tokens",
        "spo/violation",
    ] {
        assert!(train_line.get(key).is_some(), "missing {key} in {train_line}");
    }
    let eval_line = lines.iter().find(|l| l.get("eval_loss").is_some()).expect("an eval line");
    assert!(eval_line.get("eval_rewards/accuracies").is_some());
    assert_eq!(lines.iter().filter(|l| l.get("eval_loss").is_some()).count(), 2, "eval at step 2 and at the end");
    assert!(prefopt_model::HfModel::load(&out.join("final"), &candle_core::Device::Cpu).is_ok());
    for png in ["loss.png", "rewards.png", "logps.png"] {
        assert!(std::fs::metadata(out.join(png)).map(|m| m.len() > 1000).unwrap_or(false), "{png}");
    }
}

#[test]
fn a_nan_loss_stops_with_the_step_batch_and_last_checkpoint_or_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the weights up after the first update.
    let settings =
        ["max_steps=4", "learning_rate=1e30", "save_steps=1", "lr_scheduler_type=\"constant\"", "max_grad_norm=0"];
    let err = failure(train_cmd(&tmp.path().join("stop"), &settings).output().unwrap());
    assert!(
        err.contains("non-finite")
            && err.contains("at step 2")
            && err.contains("checkpoint-1")
            && err.contains("plain.jsonl:"),
        "{err}"
    );
    let mut skip: Vec<&str> = settings.to_vec();
    skip.push("on_nonfinite=\"skip\"");
    let run = ok(train_cmd(&tmp.path().join("skip"), &skip).output().unwrap());
    assert!(String::from_utf8_lossy(&run.stderr).contains("skipped"));
}

#[test]
fn bad_configs_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let err = failure(train_cmd(&out, &["bogus_key=1"]).output().unwrap());
    assert!(err.contains("bogus_key"), "{err}");
    let err = failure(train_cmd(&out, &["beta=\"high\""]).output().unwrap());
    assert!(err.contains("beta"), "{err}");
    let err = failure(train_cmd(&out, &["loss_type=\"nope\""]).output().unwrap());
    assert!(err.contains("nope") || err.contains("loss_type"), "{err}");
    let err = failure(train_cmd(&out, &["loss_type=[\"sigmoid\",\"sft\"]", "loss_weights=[1.0]"]).output().unwrap());
    assert!(err.contains("loss_weights"), "{err}");
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, "model = \"m\"\nbeta = [\n").unwrap();
    let err = failure(prefopt().args(["train", "--config", config.to_str().unwrap()]).output().unwrap());
    assert!(err.contains("run.toml"), "{err}");
    let err = failure(prefopt().args(["train", "--set", "beta=0.1"]).output().unwrap());
    assert!(err.contains("model"), "{err}");
}

#[test]
fn bad_data_and_outputs_fail_clearly_without_destroying_earlier_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        format!("train_data=\"{}\"", p.display())
    };
    let out = tmp.path().join("run");
    let err = failure(train_cmd(&out, &[&data("empty.jsonl", "")]).output().unwrap());
    assert!(err.contains("empty.jsonl") && err.contains("empty"), "{err}");
    let err =
        failure(train_cmd(&out, &[&data("cols.jsonl", "{\"prompt\": \"a\", \"chosen\": \"b\"}\n")]).output().unwrap());
    assert!(err.contains("cols.jsonl:1") && err.contains("rejected"), "{err}");
    let long = format!("{{\"prompt\": \"{}\", \"chosen\": \"b\", \"rejected\": \"c\"}}\n", "word ".repeat(50));
    let err = failure(train_cmd(&out, &[&data("long.jsonl", &long), "max_length=8"]).output().unwrap());
    assert!(err.contains("dropped") && err.contains("max_length"), "{err}");

    // An unwritable output_dir (a regular file stands where the folder should be).
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let err = failure(train_cmd(&blocker.join("run"), &["max_steps=1"]).output().unwrap());
    assert!(err.contains("output_dir"), "{err}");

    // A finished run is never overwritten by a new one in the same folder.
    ok(train_cmd(&out, &["max_steps=1"]).output().unwrap());
    let before = std::fs::read(out.join("final/model.safetensors")).unwrap();
    let err = failure(train_cmd(&out, &["max_steps=1"]).output().unwrap());
    assert!(err.contains("already holds a run"), "{err}");
    assert_eq!(before, std::fs::read(out.join("final/model.safetensors")).unwrap());
}

#[test]
fn sft_lowers_the_completion_loss_and_rejects_preference_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    let rows: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"Q: {i}+1? A:\", \"completion\": \" {}\"}}\n", i + 1))
        .chain(std::iter::once("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n".to_string()))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = tmp.path().join("run");
    let sft = |extra: &[&str]| {
        let mut cmd = prefopt();
        cmd.arg("sft");
        let base = [
            format!("model=\"{}\"", fixtures().join("models/qwen2-tied").display()),
            format!("train_data=\"{}\"", data.display()),
            format!("output_dir=\"{}\"", out.display()),
        ];
        for s in base
            .iter()
            .map(String::as_str)
            .chain([
                "max_steps=15",
                "learning_rate=3e-3",
                "batch_size=9",
                "logging_steps=1",
                "lr_scheduler_type=\"constant\"",
            ])
            .chain(extra.iter().copied())
        {
            cmd.args(["--set", s]);
        }
        cmd.output().unwrap()
    };
    let err = failure(sft(&["beta=0.1"]));
    assert!(err.contains("`beta` does not apply to `prefopt sft`"), "{err}");
    ok(sft(&[]));
    let lines: Vec<serde_json::Value> =
        read(&out.join("metrics.jsonl")).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (first, last) = (lines[0]["loss"].as_f64().unwrap(), lines.last().unwrap()["loss"].as_f64().unwrap());
    assert!(last < 0.5 * first, "SFT loss went from {first} to {last}");
    assert!(prefopt_model::HfModel::load(&out.join("final"), &candle_core::Device::Cpu).is_ok());
}

/// `report_to = "tensorboard"`: an event file that an independent reader ([`crate::tfevents`])
/// parses into exactly metrics.jsonl's numbers (as f32) at its steps, under transformers'
/// tags; a run resumed from an earlier checkpoint rewrites it to the kept steps first.
#[test]
fn tensorboard_events_mirror_metrics_jsonl_and_follow_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let eval = format!("eval_data=\"{}\"", fixtures().join("data/plain.jsonl").display());
    let settings = ["max_steps=6", "save_steps=3", "eval_steps=3", "report_to=\"tensorboard\"", eval.as_str()];
    ok(train_cmd(&out, &settings).output().unwrap());
    let events = out.join("runs/events.out.tfevents.prefopt");
    let expected = |out: &Path| -> Vec<crate::tfevents::Scalar> {
        let mut v = Vec::new();
        for line in read(&out.join("metrics.jsonl")).lines() {
            let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
            let step = obj["step"].as_i64().unwrap();
            for (k, x) in obj.iter().filter(|(k, _)| *k != "step") {
                let tag = k.strip_prefix("eval_").map_or(format!("train/{k}"), |r| format!("eval/{r}"));
                v.push((step, tag, x.as_f64().unwrap() as f32));
            }
        }
        v
    };
    let (version, scalars) = crate::tfevents::read_events(&events);
    assert_eq!(version, "brain.Event:2");
    assert_eq!(scalars, expected(&out));
    let tags: Vec<&str> = scalars.iter().map(|(_, t, _)| t.as_str()).collect();
    for tag in ["train/loss", "train/rewards/margins", "train/learning_rate", "eval/loss", "train/epoch"] {
        assert!(tags.contains(&tag), "{tag} missing from {tags:?}");
    }

    // Resume the finished run from checkpoint-3: the log and the events drop steps 4..6 and
    // get them again, once.
    let resume = format!("resume_from_checkpoint=\"{}\"", out.join("checkpoint-3").display());
    let mut again = settings.to_vec();
    again.push(resume.as_str());
    ok(train_cmd(&out, &again).output().unwrap());
    let (_, after) = crate::tfevents::read_events(&events);
    assert_eq!(after, expected(&out));
    assert_eq!(after.len(), scalars.len(), "steps 4..6 appear once");

    // A fresh run without report_to leaves no stale events behind.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir_all(fresh.join("runs")).unwrap();
    std::fs::copy(&events, fresh.join("runs/events.out.tfevents.prefopt")).unwrap();
    ok(train_cmd(&fresh, &settings[..3]).output().unwrap());
    assert!(!fresh.join("runs/events.out.tfevents.prefopt").exists(), "the old events are removed");
    let bad = failure(train_cmd(&out, &["max_steps=1", "report_to=\"wandb\""]).output().unwrap());
    assert!(bad.contains("report_to"), "{bad}");
}

/// One writer per output folder: a second run into a folder a live run holds fails at once
/// naming the holder's pid; once the holder is killed, the next run takes its lock over.
#[test]
fn a_second_run_into_a_busy_output_dir_fails_naming_the_holder_and_a_killed_holder_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let settings = ["max_steps=100000", "save_steps=0"];
    let mut child = train_cmd(&out, &settings).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("metrics.jsonl").exists() {
        assert!(Instant::now() < deadline, "the first run did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    let err = failure(train_cmd(&out, &["max_steps=1"]).output().unwrap());
    assert!(started.elapsed() < Duration::from_secs(30), "refused at once");
    assert!(err.contains("another run is writing into this folder"), "{err}");
    assert!(err.contains(&format!("pid {}", child.id())), "{err}");
    child.kill().unwrap(); // SIGKILL: the kernel drops the lock, the file keeps the holder
    child.wait().unwrap();
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::copy(out.join(".prefopt.lock"), fresh.join(".prefopt.lock")).unwrap();
    let done = ok(train_cmd(&fresh, &["max_steps=1"]).output().unwrap());
    let said = String::from_utf8_lossy(&done.stderr);
    assert!(said.contains("took over the lock left by a run that did not finish"), "{said}");
    assert!(said.contains(&format!("pid {}", child.id())), "{said}");
}

/// A disk that fills up midway (here a file-size limit, `ulimit -f`, which the kernel
/// enforces with SIGXFSZ unless the process ignores it): the run exits with an error, not a
/// signal, the message names the file that could not be written, and the previous
/// checkpoint and final/ are intact, with no half-written folder left beside them.
#[test]
fn a_write_that_fails_midway_names_the_file_and_keeps_the_previous_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(train_cmd(&out, &["max_steps=2", "save_steps=1"]).output().unwrap());
    let files = ["checkpoint-1/model.safetensors", "checkpoint-1/optimizer.safetensors", "final/model.safetensors"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(out.join(f)).unwrap()).collect();

    // The weights are 431 KB; 300 blocks of at most 1 KB are too few for them.
    let resume = format!("resume_from_checkpoint=\"{}\"", out.join("checkpoint-1").display());
    let inner = train_cmd(&out, &["max_steps=4", "save_steps=1", resume.as_str()]);
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("ulimit -f 300 && exec \"$0\" \"$@\"").arg(inner.get_program()).args(inner.get_args());
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "an error exit, not a signal: {:?}", o.status);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("File too large") && err.contains(".safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(out.join(f)).unwrap() == *b, "{f} changed");
    }
    let litter: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect();
    assert!(litter.is_empty(), "{litter:?}");
}
