//! `prefopt reward` end to end: a causal LM becomes a reward model, and the online loop judges
//! with it (`judge = "rm:<final>"`).

use crate::util::{fixtures, ok, read, read_jsonl, run_prefopt, stderr, write};

#[test]
fn a_trained_reward_model_judges_the_online_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let rm_out = tmp.path().join("rm");
    let data = fixtures().join("data/plain.jsonl");
    let rm_cfg = write(
        tmp.path(),
        "reward.toml",
        &format!(
            "model = \"{}\"\ntrain_data = \"{}\"\neval_data = \"{}\"\noutput_dir = \"{}\"\n\
             learning_rate = 1e-3\nmax_steps = 4\nbatch_size = 6\nlogging_steps = 1\nsave_steps = 0\n\
             center_rewards_coefficient = 0.01\n",
            fixtures().join("models/qwen2-tied").display(),
            data.display(),
            data.display(),
            rm_out.display()
        ),
    );
    let out = ok(run_prefopt(&["reward", "--config", rm_cfg.to_str().unwrap()]));
    assert!(stderr(&out).contains("trained 4 steps"), "{}", stderr(&out));
    let lines = read_jsonl(&rm_out.join("metrics.jsonl"));
    let (first, last_train) = (&lines[0], &lines[lines.len() - 2]);
    for key in ["loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "grad_norm"] {
        assert!(first[key].is_number(), "metrics.jsonl has no `{key}`: {first}");
    }
    assert!(lines.last().unwrap()["eval_accuracy"].is_number());
    // On its own training pairs, four steps at 1e-3 must separate chosen from rejected.
    assert!(last_train["loss"].as_f64() < first["loss"].as_f64(), "{first} -> {last_train}");
    assert!(rm_out.join("reward_model.png").is_file());
    let final_dir = rm_out.join("final");
    let config = read(&final_dir.join("config.json"));
    assert!(config.contains("Qwen2ForSequenceClassification"), "{config}");

    // The loop, judged by it: every sample gets a finite reward and the pairs follow them.
    let prompts =
        write(tmp.path(), "prompts.jsonl", "{\"prompt\": \"What is 2 + 2?\"}\n{\"prompt\": \"Say hello.\"}\n");
    let apo_out = tmp.path().join("apo");
    let apo_cfg = write(
        tmp.path(),
        "apo.toml",
        &format!(
            "model = \"{}\"\nprompts = \"{}\"\njudge = \"rm:{}\"\niterations = 1\nprompts_per_iteration = 2\n\
             num_samples = 3\nmax_new_tokens = 6\nnum_eval_prompts = 2\noutput_dir = \"{}\"\n\n[train]\n\
             learning_rate = 1e-3\nmax_steps = 1\nbatch_size = 2\nmax_length = 128\n",
            fixtures().join("models/qwen2-tied").display(),
            prompts.display(),
            final_dir.display(),
            apo_out.display()
        ),
    );
    ok(run_prefopt(&["apo", "--config", apo_cfg.to_str().unwrap()]));
    let pairs = read_jsonl(&apo_out.join("iter-1/pairs.jsonl"));
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    // The scores recorded are the trained model's rewards, recomputed here by the library.
    let rm = prefopt_loop::reward_model::RewardModel::load(&final_dir, &candle_core::Device::Cpu).unwrap();
    for row in &pairs {
        let prompt = prefopt_data::Text::Plain(row["prompt"].as_str().unwrap().into());
        let texts = [row["chosen"].as_str().unwrap().to_string(), row["rejected"].as_str().unwrap().to_string()];
        let want = rm.score(&prompt, &texts).unwrap();
        let got = [row["score_chosen"].as_f64().unwrap(), row["score_rejected"].as_f64().unwrap()];
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{row}: rewards {want:?}");
        assert!(got[0] > got[1], "{row}");
    }
}
