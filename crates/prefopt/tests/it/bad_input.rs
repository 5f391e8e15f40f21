//! Bad input across commands: each case runs the real binary and must exit non-zero, fast,
//! without a panic, with a message naming the file, line, key or tensor (the reliability
//! issue's suite; more cases live beside each command's own tests).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{failure, fixtures, prefopt, write};

/// A copy of the tied Qwen2 fixture with `edit` applied to it.
fn broken_model(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> String {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models/qwen2-tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    edit(&model);
    model.display().to_string()
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Runs `args` under a 6 GB address-space limit (`ulimit -v`: an input that makes prefopt
/// allocate what it should have refused aborts instead of erroring, which `failure` catches)
/// and checks: non-zero exit, no panic, no signal, done within 20 s, every `needles` in stderr.
fn refused(args: &[&str], needles: &[&str]) {
    let start = Instant::now();
    let bin = prefopt();
    let mut limited = std::process::Command::new("sh");
    limited.arg("-c").arg("ulimit -v 6000000 && exec \"$0\" \"$@\"").arg(bin.get_program()).args(args);
    let err = failure(limited.output().unwrap());
    assert!(start.elapsed() < Duration::from_secs(20), "{args:?} took {:?}", start.elapsed());
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
    }
    eprintln!("bad-input case `{}`: {}", args[0], err.lines().next().unwrap_or(""));
}

#[test]
fn bad_models_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = fixtures().join("data/plain.jsonl").display().to_string();
    let out = d.join("o.jsonl").display().to_string();
    let score = |model: &str, needles: &[&str]| {
        refused(&["score", "--model", model, "--data", &data, "--out", &out], needles);
    };
    let m = broken_model(d, "vocab", |m| {
        edit_json(&m.join("config.json"), |c| c["vocab_size"] = 1_000_000_000_000u64.into())
    });
    score(&m, &["config.json", "GB as f32", "vocab_size (1000000000000)"]);
    let m = broken_model(d, "negative", |m| edit_json(&m.join("config.json"), |c| c["hidden_size"] = (-5).into()));
    score(&m, &["config.json", "`hidden_size`", "-5"]);
    let m = broken_model(d, "string-layers", |m| {
        edit_json(&m.join("config.json"), |c| c["num_hidden_layers"] = "four".into())
    });
    score(&m, &["config.json", "`num_hidden_layers`"]);
    // The config says one vocabulary size, the weights another: the tensor is named.
    let m = broken_model(d, "lie", |m| edit_json(&m.join("config.json"), |c| c["vocab_size"] = 1000.into()));
    score(&m, &["model.embed_tokens.weight", "1000"]);
    let m = broken_model(d, "truncated", |m| {
        let f = std::fs::OpenOptions::new().write(true).open(m.join("model.safetensors")).unwrap();
        f.set_len(5000).unwrap();
    });
    score(&m, &["model.safetensors"]);
    let m = broken_model(d, "bomb", |m| {
        let mut bytes = (1u64 << 62).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    });
    score(&m, &["model.safetensors", "header too large"]);
    let m = broken_model(d, "heads", |m| edit_json(&m.join("config.json"), |c| c["num_attention_heads"] = 7.into()));
    score(&m, &["config.json", "num_attention_heads"]);
    let m = broken_model(d, "no-type", |m| {
        edit_json(&m.join("config.json"), |c| {
            c.as_object_mut().unwrap().remove("model_type");
        })
    });
    score(&m, &["config.json", "model_type"]);
    let m = broken_model(d, "tokenizer", |m| std::fs::write(m.join("tokenizer.json"), "{bad").unwrap());
    score(&m, &["tokenizer.json"]);
    score(&d.join("missing").display().to_string(), &["no such model folder"]);
}

#[test]
fn bad_chat_templates_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = fixtures().join("data/chat.jsonl").display().to_string();
    let out = d.join("o.jsonl").display().to_string();
    for (name, template, needle) in [
        ("raises", "{{ raise_exception(\"no system role allowed\") }}", "no system role allowed"),
        ("loops", "{% for i in range(100000000) %}{{ i }}{% endfor %}", "too many elements"),
        ("syntax", "{% for m in messages %}{{ m.content", "syntax error"),
        (
            "forever",
            "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(100) %}x{% endfor %}{% endfor %}{% endfor %}",
            "template instructions",
        ),
        (
            "megabytes",
            "{% for i in range(10000) %}{% for j in range(10000) %}{{ messages[0].content * 100000 }}{% endfor %}{% endfor %}",
            "renders more than 32 MiB",
        ),
    ] {
        let m = broken_model(d, name, |m| {
            let _ = std::fs::remove_file(m.join("chat_template.jinja"));
            edit_json(&m.join("tokenizer_config.json"), |c| c["chat_template"] = template.into());
        });
        refused(&["score", "--model", &m, "--data", &data, "--out", &out], &["chat_template", needle]);
    }
}

#[test]
fn bad_data_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = fixtures().join("models/qwen2-tied").display().to_string();
    let out = d.join("o.jsonl").display().to_string();
    let score = |data: &str, needles: &[&str]| {
        refused(&["score", "--model", &model, "--data", data, "--out", &out], needles);
    };
    score(&d.display().to_string(), &["unknown dataset format"]);
    let garbage = d.join("garbage.jsonl");
    std::fs::write(&garbage, [0xffu8, 0xfe, 0x00, 0x80].repeat(500)).unwrap();
    score(&garbage.display().to_string(), &["garbage.jsonl:1", "UTF-8"]);
    let parquet = d.join("garbage.parquet");
    std::fs::write(&parquet, b"not a parquet file at all").unwrap();
    score(&parquet.display().to_string(), &["garbage.parquet", "Parquet"]);
    let huge = format!("{{\"prompt\": \"{}\", \"chosen\": \"a\", \"rejected\": \"b\"}}\n", "x".repeat(20 << 20));
    score(&write(d, "huge.jsonl", &huge).display().to_string(), &["huge.jsonl:1", "at most 4 MiB"]);
    score(&write(d, "empty.jsonl", "\n\n").display().to_string(), &["no examples"]);
    let rows = write(d, "types.jsonl", "{\"prompt\": \"p\", \"chosen\": 5, \"rejected\": \"r\"}\n");
    score(&rows.display().to_string(), &["types.jsonl:1", "chosen"]);
    let no_role = write(
        d,
        "role.jsonl",
        "{\"chosen\": [{\"content\": \"a\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"b\"}]}\n",
    );
    score(&no_role.display().to_string(), &["role.jsonl:1"]);
}

#[test]
fn bad_arguments_and_outputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = fixtures().join("models/qwen2-tied").display().to_string();
    let prompts = fixtures().join("data/plain.jsonl").display().to_string();
    let g = d.join("g.jsonl").display().to_string();
    refused(&["generate", "--model", &model, "--prompts", &prompts, "--out", &g, "--top-p", "2"], &["--top-p"]);
    let p = write(d, "p.jsonl", "{\"prompt\": 5}\n").display().to_string();
    refused(&["generate", "--model", &model, "--prompts", &p, "--out", &g], &["p.jsonl:1", "prompt"]);
    let gen = ["generate", "--model", &model, "--prompts", &prompts, "--out", &g];
    refused(&[&gen[..], &["--sampler-url", "api.example.com/v1"]].concat(), &["--sampler-url", "not an http://"]);
    let served = ["--sampler-url", "http://127.0.0.1:9/v1"];
    refused(&[&gen[..], &served[..], &["--sampler-extra-body", "[1]"]].concat(), &["must be a JSON object"]);
    refused(&[&gen[..], &served[..], &["--sampler-extra-body", "{\"n\": 2}"]].concat(), &["`n` is set from"]);
    refused(&[&gen[..], &served[..], &["--top-k", "5"]].concat(), &["--top-k"]);
    refused(
        &[&gen[..], &served[..], &["--sampler-api-key-env", "PREFOPT_NO_SUCH_VAR"]].concat(),
        &["--sampler-api-key-env", "PREFOPT_NO_SUCH_VAR", "not set"],
    );
    refused(
        &[&gen[..], &served[..], &["--sampler-retries", "0"]].concat(),
        &["127.0.0.1:9/v1/completions: prompt ", "Connection Failed"],
    );
    refused(&["tasks", "--task", "nope", "--kind", "prompts", "--count", "3", "--out", &g], &["unknown task `nope`"]);
    refused(&["tasks", "--task", "arithmetic", "--kind", "prompts", "--count", "0", "--out", &g], &["--count"]);
    refused(&["workload", "--model", &model, "--count", "0", "--out", &g], &["--count"]);
    refused(
        &["workload", "--model", &model, "--count", "2", "--prompt-median", "0", "--out", &g],
        &["--prompt-median"],
    );
    let no_tokenizer = d.join("empty-model");
    std::fs::create_dir_all(&no_tokenizer).unwrap();
    let no_tokenizer = no_tokenizer.display().to_string();
    refused(&["workload", "--model", &no_tokenizer, "--count", "2", "--out", &g], &["tokenizer"]);
    // And the good case writes the rows, in TRL's conversational format.
    let ok_out = d.join("w/ragged.jsonl");
    let done = prefopt()
        .args(["workload", "--model", &model, "--count", "3", "--prompt-median", "20", "--completion-median", "30"])
        .arg("--out")
        .arg(&ok_out)
        .output()
        .unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&ok_out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["chosen"][0]["role"], "assistant");
    let file = write(d, "a-file", "x").display().to_string();
    refused(&["demo", "--quick", "--out", &file], &["is a file"]);
    // Architectures that would not fit in memory are refused before anything is allocated.
    let arch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/base_model/arch.json");
    for (key, value) in [("vocab_size", 1_000_000_000_000u64), ("num_hidden_layers", 1_000_000_000)] {
        let path = d.join(format!("{key}.json"));
        std::fs::copy(&arch, &path).unwrap();
        edit_json(&path, |c| c[key] = value.into());
        let init_out = d.join(format!("init-{key}")).display().to_string();
        refused(
            &["init", "--char-tokenizer", "--arch", &path.display().to_string(), "--out", &init_out],
            &[&format!("{key}.json"), "GB as f32", &format!("{key} ({value})")],
        );
        assert!(!Path::new(&init_out).exists(), "nothing written");
    }
    let bad = write(d, "bad.toml", "beta = \n").display().to_string();
    refused(&["train", "--config", &bad], &["bad.toml", "line 1"]);
    let sim = write(d, "sim.toml", "alphas = \"x\"\n").display().to_string();
    refused(&["simulate", "--config", &sim, "--out", &d.join("sim").display().to_string()], &["sim.toml", "alphas"]);
    refused(
        &[
            "merge",
            "--model",
            &model,
            "--adapter",
            &d.display().to_string(),
            "--out",
            &d.join("m").display().to_string(),
        ],
        &["adapter_config.json"],
    );
    let train_out = |dir: &str| {
        [
            "train".to_string(),
            "--set".into(),
            format!("model=\"{model}\""),
            "--set".into(),
            format!("train_data=\"{prompts}\""),
            "--set".into(),
            format!("output_dir=\"{dir}\""),
        ]
    };
    let args = train_out(&file);
    refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["output_dir", "a-file"]);
}

/// The rest of the surface, command by command: every case exits non-zero, fast, under the
/// memory limit, and names the file, line, key or flag.
#[test]
fn every_command_refuses_bad_input_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |path: &Path| path.display().to_string();
    let model = p(&fixtures().join("models/qwen2-tied"));
    let plain = p(&fixtures().join("data/plain.jsonl"));
    let out = p(&d.join("o.jsonl"));
    let missing = p(&d.join("missing.jsonl"));
    let file = |name: &str, text: &str| p(&write(d, name, text));

    // score
    let score =
        |data: &str, needles: &[&str]| refused(&["score", "--model", &model, "--data", data, "--out", &out], needles);
    score(&missing, &["missing.jsonl"]);
    score(
        &file("arrays.jsonl", "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n[1, 2]\n"),
        &["arrays.jsonl:2"],
    );
    score(&file("array.json", "[1, 2]"), &["array.json", "record 0", "JSON object"]);
    score(
        &file("null.jsonl", "{\"chosen\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": null}], \"rejected\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n"),
        &["null.jsonl:1", "content"],
    );
    score(&file("blank.jsonl", "   \n\t\n"), &["no examples"]);
    score(&file("no-rejected.jsonl", "{\"prompt\": \"p\", \"chosen\": \"c\"}\n"), &["no-rejected.jsonl:1", "rejected"]);
    refused(&["score", "--model", &model, "--data", &plain, "--out", &out, "--max-length", "0"], &["--max-length"]);
    refused(
        &["score", "--model", &model, "--data", &plain, "--out", &out, "--max-length", "2"],
        &["all 12 examples dropped"],
    );
    refused(
        &["score", "--model", &model, "--adapter", &p(&d.join("no-adapter")), "--data", &plain, "--out", &out],
        &["no-adapter"],
    );

    // generate
    let gen = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["generate", "--model", &model, "--prompts", &plain, "--out", &out];
        args.extend_from_slice(extra);
        refused(&args, needles)
    };
    gen(&["--num-samples", "0"], &["--num-samples"]);
    gen(&["--temperature=-1"], &["--temperature"]);
    refused(
        &["generate", "--model", &p(&d.join("nomodel")), "--prompts", &plain, "--out", &out],
        &["nomodel", "no such model folder"],
    );

    // train and sft: keys, types, ranges, resume
    let train_set = |cmd: &str, extra: &[String], needles: &[&str]| {
        let mut args: Vec<String> = vec![cmd.into()];
        for s in [format!("model=\"{model}\""), format!("output_dir=\"{}\"", p(&d.join(format!("{cmd}-out"))))]
            .into_iter()
            .chain(extra.iter().cloned())
        {
            args.push("--set".into());
            args.push(s);
        }
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needles)
    };
    let data = format!("train_data=\"{plain}\"");
    let with = |kv: &str| vec![data.clone(), kv.to_string()];
    train_set("train", &[], &["train_data"]);
    train_set("train", &with("beta=-1"), &["beta"]);
    train_set("train", &with("learning_rate=0"), &["learning_rate"]);
    train_set("train", &with("warmup_ratio=2"), &["warmup_ratio"]);
    train_set("train", &with("label_smoothing=0.7"), &["label_smoothing"]);
    train_set("train", &with("betta=0.1"), &["betta"]);
    train_set("train", &with("batch_size=\"eight\""), &["batch_size"]);
    train_set("train", &with("loss_type=\"nope\""), &["loss_type"]);
    train_set("train", &with("report_to=\"wandb\""), &["report_to"]);
    train_set(
        "train",
        &with("resume_from_checkpoint=\"/nonexistent/checkpoint-3\""),
        &["resume_from_checkpoint", "/nonexistent/checkpoint-3"],
    );
    train_set("sft", &with("beta=0.1"), &["beta", "does not apply"]);
    train_set(
        "sft",
        &[format!(
            "train_data=\"{}\"",
            file("pairs-for-sft.jsonl", "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n")
        )],
        &["pairs-for-sft.jsonl:1"],
    );
    // reward: keys, the margin column, the length rule, the head
    train_set("reward", &with("beta=0.1"), &["beta", "does not apply to `prefopt reward`"]);
    train_set("reward", &with("center_rewards_coefficient=-0.5"), &["center_rewards_coefficient"]);
    let pair = "\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"";
    train_set(
        "reward",
        &[format!("train_data=\"{}\"", file("half-margin.jsonl", &format!("{{{pair}, \"margin\": 1}}\n{{{pair}}}\n")))],
        &["half-margin.jsonl:2", "field `margin`: missing"],
    );
    train_set(
        "reward",
        &[format!("train_data=\"{}\"", file("text-margin.jsonl", &format!("{{{pair}, \"margin\": \"big\"}}\n")))],
        &["text-margin.jsonl:1", "field `margin`: expected a number"],
    );
    train_set("reward", &with("max_length=3"), &["all 12 examples were dropped", "not cut"]);
    let two_labels = d.join("two-labels");
    std::fs::create_dir_all(&two_labels).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models/qwen2-rm")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), two_labels.join(entry.file_name())).unwrap();
    }
    edit_json(&two_labels.join("config.json"), |c| c["num_labels"] = 2.into());
    refused(
        &[
            "reward",
            "--set",
            &format!("model=\"{}\"", p(&two_labels)),
            "--set",
            &data,
            "--set",
            &format!("output_dir=\"{}\"", p(&d.join("reward-two"))),
        ],
        &["two-labels", "score.weight"],
    );

    // apo: keys, ranges, prompts, and judges that fail in every way
    let apo = |extra: &[&str], needles: &[&str]| {
        let apo_out = p(&d.join(format!("apo-{}", extra.len() + needles.len() + needles[0].len())));
        let mut args: Vec<String> =
            ["apo", "--set", &format!("model=\"{model}\""), "--set", &format!("prompts=\"{plain}\"")]
                .iter()
                .map(|s| s.to_string())
                .collect();
        for s in ["iterations=1", "prompts_per_iteration=2", "num_samples=2", "max_new_tokens=4", "num_eval_prompts=2"]
        {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        args.extend(["--set".to_string(), format!("output_dir=\"{apo_out}\"")]);
        for e in extra {
            args.extend(["--set".to_string(), e.to_string()]);
        }
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needles)
    };
    apo(&["judge=\"arithmetic\"", "alhpa=0.3"], &["alhpa"]);
    apo(&["judge=\"arithmetic\"", "alpha=1.5"], &["alpha"]);
    apo(&["judge=\"arithmetic\"", "train.loss_type=\"kto\""], &["`train.loss_type` `kto`", "use a pair loss"]);
    apo(&["judge=\"arithmetic\"", "sampler=\"openai\""], &["needs `sampler_url`"]);
    apo(&["judge=\"arithmetic\"", "sampler=\"openai\"", "sampler_url=\"ftp://example.com/v1\""], &["not an http://"]);
    apo(
        &[
            "judge=\"arithmetic\"",
            "sampler=\"openai\"",
            "sampler_url=\"http://127.0.0.1:9/v1\"",
            "sampler_sync=\"command\"",
        ],
        &["needs `sampler_sync_command`"],
    );
    let served = ["judge=\"arithmetic\"", "sampler=\"openai\"", "sampler_url=\"http://127.0.0.1:9/v1\""];
    apo(&[&served[..], &["sampler_extra_body.seed=3"]].concat(), &["`sampler_extra_body.seed`", "sets `seed` itself"]);
    apo(&[&served[..], &["sampler_sync=\"lora\""]].concat(), &["needs `train.use_peft = true`"]);
    apo(&[&served[..], &["sampler_sync=\"lora\"", "train.use_peft=true"]].concat(), &["needs `sampler_model`"]);
    apo(&[&served[..], &["train.use_peft=true"]].concat(), &["adapter stack", "sampler_sync = \"lora\""]);
    apo(&["judge=\"llm:http://127.0.0.1:9/v1\""], &["needs `judge_model`"]);
    apo(&["judge=\"llm:localhost:9\"", "judge_model=\"j\""], &["not an http://", "localhost:9"]);
    apo(
        &["judge=\"llm:http://127.0.0.1:9/v1\"", "judge_model=\"j\"", "judge_max_failure_rate=-1"],
        &["judge_max_failure_rate"],
    );
    apo(
        &["judge=\"llm:http://127.0.0.1:9/v1\"", "judge_model=\"j\"", &format!("judge_template=\"{missing}\"")],
        &["judge_template", "missing.jsonl"],
    );
    apo(
        &["judge=\"llm:http://127.0.0.1:9/v1\"", "judge_model=\"j\"", "judge_api_key_env=\"PREFOPT_NO_SUCH_VAR\""],
        &["PREFOPT_NO_SUCH_VAR", "not set"],
    );
    apo(&["judge=\"nope\""], &["nope"]);
    apo(&["judge=\"arithmetic\"", &format!("prompts=\"{missing}\"")], &["missing.jsonl"]);
    apo(&["judge=\"cmd:echo judge broke >&2; exit 3\""], &["judge broke"]);
    apo(&["judge=\"cmd:echo not json\""], &["not a JSON line"]);
    apo(&[r#"judge='cmd:awk "{print \"{\\\"scores\\\": [NaN, 1]}\"}"'"#], &["NaN"]);
    apo(&[r#"judge='cmd:awk "{print \"{\\\"scores\\\": [1]}\"}"'"#], &["1 scores"]);
    apo(&["judge=\"cmd:sleep 30\"", "judge_timeout_s=1"], &["judge_timeout_s"]);

    // simulate, init, tasks, bench, merge, demo, workload
    refused(
        &["simulate", "--config", &file("mode.toml", "mode = \"fast\"\n"), "--out", &p(&d.join("sim"))],
        &["mode.toml", "mode"],
    );
    let arch = p(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/base_model/arch.json"));
    refused(&["init", "--arch", &arch, "--tokenizer", &p(&d.join("no-tok")), "--out", &p(&d.join("i"))], &["no-tok"]);
    refused(&["init", "--char-tokenizer", "--arch", &missing, "--out", &p(&d.join("i2"))], &["missing.jsonl"]);
    refused(&["tasks", "--task", "compare", "--kind", "nope", "--count", "3", "--out", &out], &["--kind"]);
    refused(&["bench", "dpo", "--model", &p(&d.join("nomodel"))], &["nomodel"]);
    refused(&["bench", "dpo", "--model", &model, "--data", &missing], &["missing.jsonl"]);
    refused(&["merge", "--model", &p(&d.join("nomodel")), "--out", &p(&d.join("m"))], &["nomodel"]);
    refused(&["demo", "--seeds", "0", "--out", &p(&d.join("demo"))], &["--seeds"]);
    refused(
        &["demo", "--quick", "--base-model", &p(&d.join("nomodel")), "--out", &p(&d.join("demo2"))],
        &["nomodel", "no such model folder"],
    );
    refused(
        &["workload", "--model", &model, "--count", "2", "--out", &p(&d.join("arrays.jsonl/x.jsonl"))],
        &["arrays.jsonl"],
    );
}
